"""Training objectives by ``adapter.prediction``: how real latents become ``(x_t, timestep, target)``.

The first two match the reference trainers in ``compressdit.zoo.train_dits``: DDPM epsilon prediction (the
scheduler's ``add_noise`` at uniform integer timesteps) and flow matching (uniform sigma, ``x_t = (1 - s) x0 +
s noise``, timestep ``1000 s``, velocity target ``noise - x0``). ``v`` (CogVideoX) noises as epsilon does and
targets ``v = alpha_t noise - sigma_t x0`` (Salimans & Ho 2022, arXiv 2202.00512; the scheduler's ``get_velocity``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from compressdit.models.base import ModelAdapter
from compressdit.registry import Registry
from compressdit.zoo.train_dits import noise_scheduler_config

_BETA_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "trained_betas")


class Objective(ABC):
    """Noises clean latents for one training step; every draw comes from ``gen``."""

    @abstractmethod
    def noisy(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x_t, timestep per sample, target)`` for clean latents ``x0``."""


class EpsilonObjective(Objective):
    """DDPM noise prediction. ``scheduler_config`` (e.g. the pipeline scheduler's) sets the betas; the zoo's
    linear 1e-4..0.02 over 1000 steps otherwise."""

    def __init__(self, scheduler_config: dict[str, Any] | None = None) -> None:
        from diffusers import DDPMScheduler

        betas = {k: v for k, v in dict(scheduler_config or {}).items() if k in _BETA_KEYS and v is not None}
        self.scheduler = DDPMScheduler(**{**noise_scheduler_config(), **betas})

    def noisy(self, x0, gen):
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
        return self.scheduler.add_noise(x0, noise, t), t, noise


class VelocityObjective(Objective):
    """v-prediction: ``x_t = alpha_t x0 + sigma_t noise`` at uniform integer timesteps, target ``alpha_t noise -
    sigma_t x0`` (``get_velocity``), with ``alpha_t^2`` the sampling scheduler's ``alphas_cumprod``: its betas, then
    ``snr_shift_scale`` and ``rescale_betas_zero_snr`` where its config has them, in
    ``CogVideoXDDIMScheduler``'s order (the zoo's linear betas without a config)."""

    def __init__(self, scheduler_config: dict[str, Any] | None = None) -> None:
        from diffusers.schedulers.scheduling_ddim_cogvideox import rescale_zero_terminal_snr

        config = dict(scheduler_config or {})
        alphas = EpsilonObjective(config).scheduler.alphas_cumprod
        shift = config.get("snr_shift_scale")
        if shift is not None:
            alphas = alphas / (shift + (1 - shift) * alphas)
        if config.get("rescale_betas_zero_snr"):
            alphas = rescale_zero_terminal_snr(alphas)
        self.alphas_cumprod = alphas

    def noisy(self, x0, gen):
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, len(self.alphas_cumprod), (len(x0),), generator=gen)
        alpha_sq = self.alphas_cumprod[t].to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
        alpha, sigma = alpha_sq.sqrt(), (1 - alpha_sq).sqrt()
        return alpha * x0 + sigma * noise, t, alpha * noise - sigma * x0


class FlowObjective(Objective):
    """Rectified-flow velocity prediction with uniformly drawn sigma (no shift)."""

    def __init__(self, scheduler_config: dict[str, Any] | None = None) -> None:
        del scheduler_config  # sigma is drawn uniformly, as in the flux-fmnist trainer

    def noisy(self, x0, gen):
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.rand(len(x0), generator=gen).view(-1, *[1] * (x0.dim() - 1))
        return (1 - sigma) * x0 + sigma * noise, sigma.flatten() * 1000, noise - x0


OBJECTIVES: Registry[type[Objective]] = Registry("training objective")
OBJECTIVES.add("epsilon", EpsilonObjective)
OBJECTIVES.add("v", VelocityObjective)
OBJECTIVES.add("flow", FlowObjective)


def objective_for(adapter: ModelAdapter, scheduler_config: dict[str, Any] | None = None) -> Objective:
    """The objective the adapter's family was trained with (``adapter.prediction``)."""
    return OBJECTIVES.get(adapter.prediction)(scheduler_config)
