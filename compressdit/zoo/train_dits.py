"""Trainers for the class-conditional DiT and the text-conditioned PixArt and Flux reference models."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, DPMSolverMultistepScheduler,
                       FluxTransformer2DModel, PixArtTransformer2DModel)

from compressdit.models.base import Conditioning
from compressdit.models.flux import FluxAdapter
from compressdit.zoo.captions import training_captions
from compressdit.zoo.data import CLASS_NAMES, load_fmnist
from compressdit.zoo.text import EMBED_DIM, encode_prompts
from compressdit.zoo.trainer import ResumableTrainer, TrainSchedule

NULL_CLASS = 1000
LABEL_DROP = 0.1


def noise_scheduler_config() -> dict:
    return dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                prediction_type="epsilon")


def dit_config() -> dict:
    """DiT-XL/2 structure scaled down: 12 blocks, 4 heads x 32, patch 2 on 4x8x8 latents."""
    return dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=12,
                sample_size=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def pixart_config() -> dict:
    """PixArt-alpha structure scaled down: 8 blocks, cross-attention on 384-d MiniLM tokens."""
    return dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=8,
                sample_size=8, patch_size=2, cross_attention_dim=128, caption_channels=EMBED_DIM,
                norm_type="ada_norm_single", use_additional_conditions=False)


def flux_config() -> dict:
    """FLUX.1 structure scaled down: 4 double-stream + 8 single-stream blocks, hidden 128, MiniLM text."""
    return dict(patch_size=1, in_channels=16, out_channels=None, num_layers=4, num_single_layers=8,
                attention_head_dim=32, num_attention_heads=4, joint_attention_dim=EMBED_DIM,
                pooled_projection_dim=EMBED_DIM, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


@torch.no_grad()
def encode_latents(vae_dir: Path, cache: Path, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE latents (posterior means) of the training set (its first ``limit`` images), cached at ``cache``."""
    if cache.exists():
        data = torch.load(cache, weights_only=True)
        return data["latents"], data["labels"]
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    images, labels = load_fmnist("train")
    images, labels = images[:limit], labels[:limit]
    latents = torch.cat([vae.encode(images[i:i + 1000]).latent_dist.mean for i in range(0, len(images), 1000)])
    latents = latents * vae.config.scaling_factor
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    torch.save({"latents": latents, "labels": labels}, tmp)
    tmp.replace(cache)  # a reader never sees a half-written cache
    return latents, labels


def _adaln_zero_init(model: DiTTransformer2DModel) -> None:
    for block in model.transformer_blocks:
        torch.nn.init.zeros_(block.norm1.linear.weight)
        torch.nn.init.zeros_(block.norm1.linear.bias)
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    for layer in (model.proj_out_1, model.proj_out_2):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)


def _diffusion_loss(predict, latents: torch.Tensor, scheduler: DDPMScheduler, gen: torch.Generator):
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    return F.mse_loss(predict(noisy, t), noise)


def train_dit(vae_dir: Path, out_dir: Path, workdir: Path, steps: int = 2400, max_minutes: float | None = None,
              quiet: bool = False) -> dict | None:
    """Train ``dit-fmnist`` and save it as a stock ``DiTPipeline`` folder (fp16)."""
    latents, labels = encode_latents(vae_dir, workdir.parent / "latents.pt")
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**dit_config())
    _adaln_zero_init(model)
    scheduler = DDPMScheduler(**noise_scheduler_config())
    trainer = ResumableTrainer(model, TrainSchedule(steps=steps, lr=1e-3, batch_size=256, warmup=200,
                                                    ema_decay=0.999, max_minutes=max_minutes), workdir, "dit")

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(latents), (256,), generator=gen)
        y = labels[idx].clone()
        y[torch.rand(256, generator=gen) < LABEL_DROP] = NULL_CLASS
        return _diffusion_loss(lambda x, t: model(x, timestep=t, class_labels=y).sample, latents[idx],
                               scheduler, gen)

    if not trainer.run(loss_fn, quiet=quiet):
        return None
    info = {"steps": trainer.step, "batch_size": 256, "train_seconds": round(trainer.train_seconds, 1)}
    save_dit_pipeline(trainer.final_model(), vae_dir, out_dir, info)
    return info


def save_dit_pipeline(transformer: DiTTransformer2DModel, vae_dir: Path, out_dir: Path, info: dict) -> None:
    """Write a stock ``DiTPipeline`` folder (fp16) with the label table and training facts."""
    from diffusers import DiTPipeline

    vae = AutoencoderKL.from_pretrained(vae_dir)
    pipe = DiTPipeline(transformer=transformer, vae=vae,
                       scheduler=DPMSolverMultistepScheduler(**noise_scheduler_config()),
                       id2label={i: name for i, name in enumerate(CLASS_NAMES)})
    pipe.register_to_config(id2label={str(i): name for i, name in enumerate(CLASS_NAMES)})
    pipe.to(torch.float16).save_pretrained(out_dir)
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))


def _caption_sampler():
    """Per-class caption embeddings; ``draw(labels, gen)`` picks one caption of each label (10% dropped)."""
    captions, caption_labels = training_captions()
    embeds, mask = encode_prompts(captions)
    null_embeds, null_mask = encode_prompts([""])
    by_class = [torch.tensor([i for i, c in enumerate(caption_labels) if c == k]) for k in range(10)]

    def draw(labels: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.stack([by_class[int(c)][torch.randint(0, len(by_class[int(c)]), (1,), generator=gen)]
                            for c in labels]).squeeze(1)
        chosen, chosen_mask = embeds[pick].clone(), mask[pick].clone()
        drop = torch.rand(len(labels), generator=gen) < LABEL_DROP
        chosen[drop], chosen_mask[drop] = null_embeds[0], null_mask[0]
        return chosen, chosen_mask

    return draw


def _save_parts(transformer, vae_dir: Path, out_dir: Path, scheduler, info: dict) -> None:
    """transformer (fp16) + VAE + scheduler folders and ``training.json``."""
    transformer.to(torch.float16).save_pretrained(out_dir / "transformer")
    AutoencoderKL.from_pretrained(vae_dir).save_pretrained(out_dir / "vae")
    scheduler.save_pretrained(out_dir / "scheduler")
    (out_dir / "training.json").write_text(json.dumps(info, indent=2))


def train_pixart(vae_dir: Path, out_dir: Path, workdir: Path, steps: int = 4000,
                 max_minutes: float | None = None, quiet: bool = False) -> dict | None:
    """Train ``pixart-fmnist`` (captions -> MiniLM tokens -> cross-attention); saves transformer + VAE."""
    latents, labels = encode_latents(vae_dir, workdir.parent / "latents.pt")
    draw_captions = _caption_sampler()
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**pixart_config())
    scheduler = DDPMScheduler(**noise_scheduler_config())
    trainer = ResumableTrainer(model, TrainSchedule(steps=steps, lr=1e-3, batch_size=256, warmup=200,
                                                    ema_decay=0.999, max_minutes=max_minutes),
                               workdir, "pixart")

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(latents), (256,), generator=gen)
        embeds, mask = draw_captions(labels[idx], gen)
        return _diffusion_loss(
            lambda x, t: model(x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t,
                               added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample,
            latents[idx], scheduler, gen)

    if not trainer.run(loss_fn, quiet=quiet):
        return None
    info = {"steps": trainer.step, "batch_size": 256, "train_seconds": round(trainer.train_seconds, 1)}
    _save_parts(trainer.final_model(), vae_dir, out_dir, DPMSolverMultistepScheduler(**noise_scheduler_config()),
                info)
    return info


def train_flux(vae_dir: Path, out_dir: Path, workdir: Path, steps: int = 3000,
               max_minutes: float | None = None, quiet: bool = False) -> dict | None:
    """Train ``flux-fmnist`` by flow matching (velocity ``noise - x0``, linear sigmas), MiniLM captions."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    latents, labels = encode_latents(vae_dir, workdir.parent / "latents.pt")
    draw_captions = _caption_sampler()
    adapter = FluxAdapter()
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**flux_config())
    trainer = ResumableTrainer(model, TrainSchedule(steps=steps, lr=1e-3, batch_size=256, warmup=200,
                                                    ema_decay=0.999, max_minutes=max_minutes), workdir, "flux")

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(latents), (256,), generator=gen)
        embeds, mask = draw_captions(labels[idx], gen)
        pooled = (embeds * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        x0, noise = latents[idx], torch.randn(latents[idx].shape, generator=gen)
        sigma = torch.rand(256, generator=gen).view(-1, 1, 1, 1)
        noisy = (1 - sigma) * x0 + sigma * noise
        cond = Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})
        velocity = adapter.predict(model, noisy, sigma.flatten() * 1000, cond)  # one timestep per sample
        return F.mse_loss(velocity, noise - x0)

    if not trainer.run(loss_fn, quiet=quiet):
        return None
    info = {"steps": trainer.step, "batch_size": 256, "train_seconds": round(trainer.train_seconds, 1),
            "objective": "flow matching, uniform sigma, velocity target"}
    _save_parts(trainer.final_model(), vae_dir, out_dir, FlowMatchEulerDiscreteScheduler(shift=1.0), info)
    return info

