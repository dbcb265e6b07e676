"""The denoising loop shared by every adapter, with classifier-free guidance and a per-step hook."""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models.base import Conditioning, ModelAdapter
from compressdit.models.prompt_encoders import PromptEncoder, encode_null, resolve_prompts

StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


def initial_latents(adapter: ModelAdapter, model: nn.Module, count: int, seed: int) -> torch.Tensor:
    """Gaussian latents drawn per sample from ``seed + i``, so a sample never depends on batch size."""
    shape = adapter.latent_shape(model)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + i)) for i in range(count)])


@torch.no_grad()
def guided_prediction(adapter: ModelAdapter, model: nn.Module, latents: torch.Tensor, t: torch.Tensor,
                      cond: Conditioning, uncond: Conditioning | None, guidance: float) -> torch.Tensor:
    """Model output with classifier-free guidance (one batched call over cond + uncond)."""
    if uncond is None or guidance == 1.0:
        return adapter.predict(model, latents, t, cond)
    both = adapter.predict(model, torch.cat([latents, latents]), t, cond.cat(uncond))
    eps_cond, eps_uncond = both.chunk(2)
    return eps_uncond + guidance * (eps_cond - eps_uncond)


@torch.no_grad()
def sample(adapter: ModelAdapter, model: nn.Module, conditions: list[Any], scheduler, steps: int = 20,
           guidance: float = 4.0, seed: int = 0, latents: torch.Tensor | None = None,
           on_step: StepHook | None = None, batch_size: int = 64,
           prompt_encoder: PromptEncoder | None = None) -> torch.Tensor:
    """Sample latents for ``conditions``; ``on_step(i, t, latents_in, prediction)`` sees every step.

    ``prompt_encoder`` embeds prompts (and the null prompts of classifier-free guidance) with the model's own text
    encoder; without one, prompts reach ``adapter.encode`` as strings. An adapter that drives its pipeline
    (:mod:`compressdit.models.driven`) samples with the stock ``__call__`` instead (per-sample seeds; no ``latents``).
    """
    if adapter.drives_pipeline:
        if latents is not None:
            raise ConfigError(f"{adapter.model_class_name}: a pipeline sampled through its own __call__ draws its own "
                              "latents (per-sample seeds); pass seed, not latents")
        return adapter.drive(model, list(conditions), steps, guidance, seed, on_step, batch_size)
    param = next(model.parameters())
    device = param.device
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if latents is None:
        latents = initial_latents(adapter, model, len(conditions), seed)
    conditions = resolve_prompts(conditions, prompt_encoder)
    outputs = []
    for start in range(0, len(conditions), batch_size):
        chunk = conditions[start:start + batch_size]
        x = latents[start:start + len(chunk)].to(device, torch.float32)
        sched = copy.deepcopy(scheduler)
        adapter.set_timesteps(model, sched, steps, x, device)
        cond = adapter.encode(model, chunk).to(device, dtype)
        uncond = encode_null(adapter, model, len(chunk), prompt_encoder).to(device, dtype) \
            if guidance != 1.0 else None
        x = x * getattr(sched, "init_noise_sigma", 1.0)
        for i, t in enumerate(sched.timesteps):
            model_in = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
            pred = guided_prediction(adapter, model, model_in.to(dtype), t.reshape(1).to(device), cond, uncond,
                                     guidance).float()
            if on_step is not None:
                on_step(i, t, model_in, pred)
            x = sched.step(pred, t, x).prev_sample
        outputs.append(x)
    return torch.cat(outputs)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """VAE-decode scaled latents to images in [-1, 1]."""
    dtype = next(vae.parameters()).dtype
    scale = vae.config.scaling_factor
    images = [vae.decode((latents[i:i + batch_size] / scale).to(dtype)).sample.float()
              for i in range(0, len(latents), batch_size)]
    return torch.cat(images).clamp(-1, 1)
