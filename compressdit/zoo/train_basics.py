"""Trainers for the metric classifier and the shared Fashion-MNIST VAE."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from compressdit.zoo.classifier import FashionClassifier
from compressdit.zoo.data import load_fmnist
from compressdit.zoo.trainer import ResumableTrainer, TrainSchedule


def vae_config() -> dict:
    """A 681k-parameter ``AutoencoderKL``: 1x32x32 images <-> 4x8x8 latents."""
    return dict(
        in_channels=1, out_channels=1, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16,
    )


@torch.no_grad()
def classifier_accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), 1000):
        correct += (model(images[i:i + 1000]).argmax(1) == labels[i:i + 1000]).sum().item()
    return correct / len(images)


def train_classifier(out_dir: Path, workdir: Path, steps: int = 1900, max_minutes: float | None = None,
                     quiet: bool = False) -> dict | None:
    """Train the metric classifier (~4 epochs at batch 128); writes ``classifier.safetensors``."""
    images, labels = load_fmnist("train")
    model = FashionClassifier()
    trainer = ResumableTrainer(model, TrainSchedule(steps=steps, lr=2e-3, batch_size=128, warmup=50,
                                                    max_minutes=max_minutes), workdir, "classifier")

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(0, len(images), (128,), generator=gen)
        batch = images[idx]
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        batch = torch.roll(batch, shifts=shift, dims=(2, 3))
        return F.cross_entropy(model(batch), labels[idx])

    if not trainer.run(loss_fn, quiet=quiet):
        return None
    test_images, test_labels = load_fmnist("test")
    metrics = {"test_accuracy": classifier_accuracy(model, test_images, test_labels),
               "steps": trainer.step, "batch_size": 128, "train_seconds": round(trainer.train_seconds, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()},
              str(out_dir / "classifier.safetensors"))
    (out_dir / "classifier_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def load_classifier(path: Path) -> FashionClassifier:
    model = FashionClassifier()
    state = load_file(str(path))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def train_vae(out_dir: Path, workdir: Path, steps: int = 900, max_minutes: float | None = None,
              quiet: bool = False) -> dict | None:
    """Train the shared VAE (MSE + L1 + 1e-6 KL); writes a diffusers ``AutoencoderKL`` folder."""
    images, _ = load_fmnist("train")
    vae = AutoencoderKL(**vae_config())
    trainer = ResumableTrainer(vae, TrainSchedule(steps=steps, lr=1.5e-3, batch_size=128, warmup=50,
                                                  max_minutes=max_minutes, checkpoint_every=100),
                               workdir, "vae")

    def loss_fn(gen: torch.Generator) -> torch.Tensor:
        batch = images[torch.randint(0, len(images), (128,), generator=gen)]
        posterior = vae.encode(batch).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        kl = posterior.kl().mean()
        return F.mse_loss(recon, batch) + F.l1_loss(recon, batch) + 1e-6 * kl

    if not trainer.run(loss_fn, quiet=quiet):
        return None
    vae.eval()
    test_images, _ = load_fmnist("test")
    with torch.no_grad():
        latents = torch.cat([vae.encode(test_images[i:i + 500]).latent_dist.mean
                             for i in range(0, 2000, 500)])
        recon = torch.cat([vae.decode(latents[i:i + 500]).sample for i in range(0, 2000, 500)]).clamp(-1, 1)
    mse = F.mse_loss(recon, test_images[:2000]).item()
    psnr = 10 * torch.log10(torch.tensor(4.0 / mse)).item()
    scaling = 1.0 / latents.std().item()
    vae.register_to_config(scaling_factor=scaling)
    out_dir.mkdir(parents=True, exist_ok=True)
    vae.to(torch.float16).save_pretrained(out_dir)
    metrics = {"test_psnr_db": round(psnr, 2), "scaling_factor": scaling, "steps": trainer.step,
               "batch_size": 128, "train_seconds": round(trainer.train_seconds, 1)}
    (out_dir / "vae_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
