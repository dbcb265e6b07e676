"""A small resumable training loop shared by the reference-model trainers."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from compressdit.progress import progress_bar


@dataclass
class TrainSchedule:
    """How long and how fast to train; ``max_minutes`` caps wall time (the run resumes later)."""

    steps: int
    lr: float
    batch_size: int
    warmup: int = 100
    ema_decay: float | None = None
    max_minutes: float | None = None
    checkpoint_every: int = 200
    seed: int = 0


class ResumableTrainer:
    """Optimises ``model`` with AdamW + cosine schedule, checkpointing to ``workdir/state.pt``."""

    def __init__(self, model: nn.Module, schedule: TrainSchedule, workdir: Path, name: str) -> None:
        self.model = model
        self.schedule = schedule
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=0.0)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False) if schedule.ema_decay else None
        self.step = 0
        self.train_seconds = 0.0
        self.generator = torch.Generator().manual_seed(schedule.seed)
        self._resume()

    @property
    def state_path(self) -> Path:
        return self.workdir / "state.pt"

    def _resume(self) -> None:
        if not self.state_path.exists():
            return
        state = torch.load(self.state_path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.step = state["step"]
        self.train_seconds = state["train_seconds"]
        self.generator.set_state(state["generator"])

    def save_state(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "step": self.step,
            "train_seconds": self.train_seconds,
            "generator": self.generator.get_state(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(self.state_path)

    def _lr(self) -> float:
        s = self.schedule
        if self.step < s.warmup:
            return s.lr * (self.step + 1) / s.warmup
        progress = (self.step - s.warmup) / max(1, s.steps - s.warmup)
        return s.lr * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

    def run(self, loss_fn: Callable[[torch.Generator], torch.Tensor], quiet: bool = False) -> bool:
        """Train until ``steps`` (returns True) or the time cap (returns False, state saved)."""
        s = self.schedule
        started = time.monotonic()
        self.model.train()
        with progress_bar(f"train {self.name}", total=s.steps, completed=self.step, quiet=quiet) as bar:
            while self.step < s.steps:
                t0 = time.monotonic()
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr()
                loss = loss_fn(self.generator)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{self.name}: loss became {loss.item()} at step {self.step}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                if self.ema is not None:
                    # warm-up: a fixed 0.999 would still hold exp(-2) of the initial weights after 2000 steps
                    decay = min(s.ema_decay, (1.0 + self.step) / (10.0 + self.step))
                    with torch.no_grad():
                        for e, p in zip(self.ema.parameters(), self.model.parameters()):
                            e.lerp_(p, 1.0 - decay)
                self.step += 1
                self.train_seconds += time.monotonic() - t0
                bar.update(1, loss=float(loss.detach()))
                if self.step % s.checkpoint_every == 0:
                    self.save_state()
                if s.max_minutes is not None and time.monotonic() - started > 60 * s.max_minutes:
                    self.save_state()
                    return False
        self.save_state()
        self.model.eval()
        return True

    def final_model(self) -> nn.Module:
        """The EMA weights when EMA is on, else the trained model."""
        return (self.ema if self.ema is not None else self.model).eval()
