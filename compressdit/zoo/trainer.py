"""A small resumable training loop shared by the reference-model trainers and distillation.

One process by default; given an ``accelerate.Accelerator`` with several processes (``torchrun`` or
``accelerate launch``), gradients are averaged across them with one flat all-reduce, only the main process
writes checkpoints and every process stops at the same step. The model is not wrapped in DDP: adapters read
attributes of the model (``model.config``) that a DDP wrapper hides.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
from torch import nn

from compressdit.progress import progress_bar

LossResult = Union[torch.Tensor, tuple[torch.Tensor, dict[str, float]]]


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
    weight_decay: float = 0.0


class ResumableTrainer:
    """Optimises ``model`` with AdamW + cosine schedule, checkpointing to ``workdir/state.pt``.

    The checkpoint holds the model, EMA, optimizer, step, the loss history and the RNG states (the trainer's
    generator and torch's global one), so a resumed run continues exactly where it stopped. ``train_mode=False``
    keeps the model in eval mode while training (no module-internal dropout drawing from the global RNG).
    """

    def __init__(self, model: nn.Module, schedule: TrainSchedule, workdir: Path, name: str,
                 accelerator=None, train_mode: bool = True) -> None:
        self.model = model
        self.schedule = schedule
        self.workdir = Path(workdir)
        self.name = name
        self.accelerator = accelerator
        self.train_mode = train_mode
        self.is_main = accelerator is None or accelerator.is_main_process
        if self.is_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=schedule.lr, weight_decay=schedule.weight_decay)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False) if schedule.ema_decay else None
        self.step = 0
        self.train_seconds = 0.0
        self.history: list[dict[str, float]] = []
        self.generator = torch.Generator().manual_seed(schedule.seed)
        self._resume()

    @property
    def state_path(self) -> Path:
        return self.workdir / "state.pt"

    @property
    def distributed(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

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
        self.history = state.get("history", [])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])

    def save_state(self) -> None:
        """Write the checkpoint (main process only; every process waits for it)."""
        if self.is_main:
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step,
                "train_seconds": self.train_seconds,
                "generator": self.generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "history": self.history,
            }
            tmp = self.state_path.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(self.state_path)
        if self.distributed:
            self.accelerator.wait_for_everyone()

    def _lr(self) -> float:
        s = self.schedule
        if self.step < s.warmup:
            return s.lr * (self.step + 1) / s.warmup
        progress = (self.step - s.warmup) / max(1, s.steps - s.warmup)
        return s.lr * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

    def _average_gradients(self) -> None:
        """Mean of every gradient over the processes (one flat all-reduce)."""
        if not self.distributed:
            return
        with_grad = [p for p in self.params if p.grad is not None]
        flat = self.accelerator.reduce(torch.cat([p.grad.reshape(-1) for p in with_grad]), reduction="mean")
        offset = 0
        for p in with_grad:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def _logged(self, loss: torch.Tensor, parts: dict[str, float]) -> dict[str, float]:
        """The step's loss values, averaged over the processes so every process logs the same numbers."""
        names = ["loss", *parts]
        values = torch.tensor([float(loss.detach()), *parts.values()], dtype=torch.float64)
        if self.distributed:
            values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean").cpu()
        return dict(zip(names, values.tolist()))

    def _should_stop(self, started: float, stop_at: int | None) -> bool:
        s = self.schedule
        stop = (stop_at is not None and self.step >= stop_at) or \
            (s.max_minutes is not None and time.monotonic() - started > 60 * s.max_minutes)
        if self.distributed:  # the main process decides, so every process stops at the same step
            from accelerate.utils import broadcast

            flag = torch.tensor([float(stop)], device=self.accelerator.device)
            stop = bool(broadcast(flag, from_process=0).item())
        return stop

    def run(self, loss_fn: Callable[[torch.Generator], LossResult], quiet: bool = False,
            stop_at: int | None = None) -> bool:
        """Train until ``steps`` (returns True), or until the time cap or step ``stop_at`` (returns False).

        ``loss_fn(generator)`` returns the loss, or ``(loss, {name: value})`` to log loss components too.
        """
        s = self.schedule
        started = time.monotonic()
        self.model.train(self.train_mode)
        with progress_bar(f"train {self.name}", total=s.steps, completed=self.step,
                          quiet=quiet or not self.is_main) as bar:
            while self.step < s.steps:
                t0 = time.monotonic()
                for group in self.optimizer.param_groups:
                    group["lr"] = self._lr()
                result = loss_fn(self.generator)
                loss, parts = result if isinstance(result, tuple) else (result, {})
                logged = self._logged(loss, parts)
                if not all(map(torch.isfinite, torch.tensor(list(logged.values())))):
                    raise FloatingPointError(f"{self.name}: loss became {logged['loss']} at step {self.step}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self._average_gradients()
                torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                self.optimizer.step()
                if self.ema is not None:
                    # warm-up: a fixed 0.999 would still hold exp(-2) of the initial weights after 2000 steps
                    decay = min(s.ema_decay, (1.0 + self.step) / (10.0 + self.step))
                    with torch.no_grad():
                        for e, p in zip(self.ema.parameters(), self.model.parameters()):
                            e.lerp_(p, 1.0 - decay)
                self.step += 1
                self.train_seconds += time.monotonic() - t0
                self.history.append(logged)
                bar.update(1, loss=logged["loss"])
                if self.step % s.checkpoint_every == 0:
                    self.save_state()
                if self.step < s.steps and self._should_stop(started, stop_at):
                    if self.step % s.checkpoint_every:
                        self.save_state()
                    return False
        self.save_state()
        self.model.eval()
        return True

    def final_model(self) -> nn.Module:
        """The EMA weights when EMA is on, else the trained model."""
        return (self.ema if self.ema is not None else self.model).eval()
