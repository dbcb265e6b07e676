"""Sampling through a pipeline's own ``__call__``: calibration for diffusers families without a compressdit adapter.

A :class:`~compressdit.models.generic.GenericAdapter` knows a model's layers but not its calling convention
(latent layout, timestep scale, position ids, extra conditions): that lives in the family's diffusers pipeline.
When the source is a pipeline folder (Sana, Lumina2, AuraFlow, Chroma, HunyuanDiT, CogView4, Qwen-Image, LTX, ...),
:class:`DrivenAdapter` lets that pipeline sample: ``pipeline(prompts, num_inference_steps=..., guidance_scale=...,
generator=[one per sample], output_type="latent")`` with the transformer being compressed in the ``transformer``
slot, so its text encoders, schedulers and guidance are exactly the stock ones (a pipeline that takes guidance
another way, Qwen-Image's ``true_cfg_scale`` with a negative prompt, gets it that way:
:mod:`compressdit.models.pipeline_calls`). A forward pre-hook on the
transformer (a context manager) reads the ``timestep`` each call gets: a new value starts a new denoising step, so
pipelines that run the conditional and unconditional halves as two calls count once per step, like the adapters'
batched guidance. Statistics hooks on the layers (calibration, GPTQ Hessians, LRQ, AdaRound) then see the stock
trajectory. Seeds are per sample (``seed + i``), so a sample never depends on the batch size.

What it cannot do: anything that calls the transformer outside the pipeline's loop (single-step probes of mixed
precision, per-step trajectory metrics, distillation): those still raise the generic adapter's one-line error.
``size`` (pixels, square) overrides the pipeline's default resolution (and turns resolution binning off, so it is
the size sampled) and ``call`` adds keyword arguments of the pipeline's ``__call__`` (``calibrate: {size: 512,
call: {num_frames: 49, max_sequence_length: 64}}``). A stock ``__call__`` that refuses them (``ValueError`` /
``TypeError``) is one line naming them; a pipeline that misses an optional package (SkyReels-V2: ``ftfy``; OmniGen:
``torchvision``; Cosmos: ``cosmos_guardrail``) is one line naming it.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from compressdit.errors import ConfigError, UnsupportedModelError
from compressdit.models.generic import GenericAdapter
from compressdit.models.pipeline_calls import call_parameters, guidance_call, missing_package, prepare, size_options

StepCallback = Callable[[int, torch.Tensor, None, None], None]
RESERVED = ("prompt", "generator", "num_inference_steps", "output_type")  # compressdit passes these itself


def timestep_of(model: nn.Module, args: tuple, kwargs: dict) -> float:
    """The ``timestep`` (or ``timesteps``) argument of a transformer call, by keyword or position (HunyuanDiT's
    pipeline passes it second, positionally), as a float."""
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    value = bound.get("timestep", bound.get("timesteps"))
    if value is None:
        raise UnsupportedModelError(f"the pipeline called {type(model).__name__} without a `timestep` argument: "
                                    "compressdit cannot tell its denoising steps apart; use a calibration-free recipe")
    return float(torch.as_tensor(value).flatten()[0])


class StepCounter:
    """Denoising steps of a pipeline's transformer calls: a step is a run of calls with one ``timestep`` value
    (pipelines that run the conditional and unconditional halves as two calls count once per step).
    ``step`` / ``t``: the step of the call being made (``-1`` / ``None`` before the first);
    ``on_step(i, t, None, None)`` runs after step ``i`` (before step ``i + 1``'s first call, and from
    :meth:`close` for the last step)."""

    def __init__(self, on_step: StepCallback | None = None) -> None:
        self.step, self.t, self.on_step = -1, None, on_step

    def see(self, t: float) -> None:
        if t != self.t:
            self.close()
            self.step, self.t = self.step + 1, t

    def close(self) -> None:
        if self.t is not None and self.on_step is not None:
            self.on_step(self.step, torch.tensor(self.t), None, None)


@contextlib.contextmanager
def denoising_steps(model: nn.Module, on_step: StepCallback | None = None) -> Iterator[StepCounter]:
    """A :class:`StepCounter` of ``model``'s calls while inside (a forward pre-hook, so a forward hook of the
    caller's reads the step of the call it sees); the last step's ``on_step`` runs on leaving."""
    counter = StepCounter(on_step)
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: counter.see(timestep_of(m, args, kwargs)),
                                             with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()
    counter.close()


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """diffusers' and transformers' loading bars off (they would interleave with compressdit's own output)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in saved:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in saved:
            if enabled:
                module.enable_progress_bar()


def configure_call(adapter, size: int | None, call: dict | None, where: str) -> None:
    """Hand a stage's ``size`` / ``call`` to a driven adapter; a one-line error for any other adapter."""
    if size is None and not call:
        return
    if not adapter.drives_pipeline:
        raise ConfigError(f"{where}.size / {where}.call apply only to a pipeline folder sampled through its own "
                          f"__call__ (a family without a compressdit adapter); {adapter.model_class_name} is not one: "
                          "remove them")
    adapter.set_call(size, call)


class DrivenAdapter(GenericAdapter):
    """A generic adapter whose sampling runs the pipeline folder's stock ``__call__`` (see module doc)."""

    family = "generic-pipeline"
    drives_pipeline = True

    def __init__(self, model: nn.Module, folder: Path) -> None:
        super().__init__(model)
        self.folder = Path(folder)
        self.size: int | None = None
        self.call: dict = {}
        self._pipeline = None
        #: names the pipeline (its model_index.json) in calibration cache keys
        self.key = hashlib.sha256((self.folder / "model_index.json").read_bytes()).hexdigest()[:16]

    def cannot_sample(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{self.model_class_name} is sampled through its pipeline's own __call__ (no family adapter): "
            f"calibration and evaluation run, but what calls the transformer outside that loop (ViDiT-Q mixed "
            f"precision probes, VQ4DiT's codebook training, distillation, pruning) cannot; use a recipe without them")

    def set_call(self, size: int | None, call: dict | None) -> None:
        """Square resolution in pixels (``None``: the pipeline's default) and extra ``__call__`` keywords for every
        later sampling call."""
        self.size, self.call = size, dict(call or {})

    def pipeline(self, model: nn.Module):
        """The stock pipeline of the folder with ``model`` in its transformer slot, on ``model``'s device."""
        from diffusers import DiffusionPipeline

        param = next(model.parameters())
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        if self._pipeline is None:
            try:
                with _quiet_loading():
                    self._pipeline = DiffusionPipeline.from_pretrained(self.folder, transformer=model, dtype=dtype)
            except NameError as exc:  # a pipeline module whose optional import failed
                raise UnsupportedModelError(f"loading the stock pipeline of {self.folder} failed ({exc}): "
                                            f"{missing_package(exc)}") from None
            except ImportError as exc:
                raise UnsupportedModelError(f"loading the stock pipeline of {self.folder} failed: "
                                            f"{' '.join(str(exc).split())}") from None
            prepare(self._pipeline)
            self._pipeline.set_progress_bar_config(disable=True)
        pipe = self._pipeline
        if pipe.transformer is not model:
            pipe = type(pipe)(**{**pipe.components, "transformer": model})
            pipe.set_progress_bar_config(disable=True)
        return pipe.to(param.device)

    def _call_options(self, pipe, steps: int, output_type: str) -> dict:
        """The keywords of every call but the guidance ones (:meth:`drive` adds those per chunk of prompts)."""
        parameters = call_parameters(type(pipe))
        options = {"num_inference_steps": steps, "output_type": output_type}
        if self.size is not None:
            if not {"height", "width"} <= set(parameters):
                raise ConfigError(f"size: {type(pipe).__name__}.__call__ takes no height / width")
            options.update(size_options(type(pipe), self.size))
        for key in self.call:
            if key in RESERVED or key not in parameters:
                raise ConfigError(f"call: {key!r} is not a keyword compressdit can pass to {type(pipe).__name__}"
                                  f".__call__ (it takes {', '.join(k for k in parameters if k not in RESERVED + ('self',))})")
        return {**options, **self.call}

    def _guidance_options(self, pipe, guidance: float, prompts: int) -> dict:
        convention = guidance_call(type(pipe))
        if convention.scale not in call_parameters(type(pipe)):
            return {}  # a pipeline without guidance (distilled, one-step)
        return {k: v for k, v in convention.options(guidance, prompts).items() if k not in self.call}

    @contextlib.contextmanager
    def _failures(self, pipe) -> Iterator[None]:
        """A stock ``__call__`` that fails on the keywords compressdit passed: one line naming them and the fix."""
        try:
            yield
        except NameError as exc:  # a pipeline module whose optional import failed
            raise UnsupportedModelError(f"the stock {type(pipe).__name__}.__call__ failed ({exc}): "
                                        f"{missing_package(exc)}") from None
        except (ValueError, TypeError) as exc:  # what pipelines raise on arguments they refuse
            reason = " ".join(str(exc).split())[:300]
            raise ConfigError(f"the stock {type(pipe).__name__}.__call__ failed with size {self.size or 'default'}"
                              f"{f' and call {self.call}' if self.call else ''}: {reason}; set calibrate/evaluate "
                              "size or call (keywords of that __call__) to values it takes") from exc

    @torch.no_grad()
    def drive(self, model: nn.Module, prompts: list[str], steps: int, guidance: float, seed: int,
              on_step: StepCallback | None, batch_size: int, output_type: str = "latent") -> torch.Tensor:
        """Final latents of ``prompts`` from the stock pipeline, ``batch_size`` prompts per call (``output_type=
        "pt"``: the decoded images in ``[0, 1]``, as the pipeline returns them)."""
        if not all(isinstance(p, str) for p in prompts):
            raise ConfigError(f"{self.model_class_name}: a pipeline sampled through its own __call__ takes prompts "
                              "(a calibration set with a `prompt` column), not class ids or embeddings")
        pipe = self.pipeline(model)
        options = self._call_options(pipe, steps, output_type)
        outputs = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            with denoising_steps(model, on_step), self._failures(pipe):
                result = pipe(prompt=chunk, generator=generators, **options,
                              **self._guidance_options(pipe, guidance, len(chunk)))
            latents = getattr(result, "images", None)
            if latents is None:
                latents = getattr(result, "frames", None)
            outputs.append(torch.as_tensor(latents).float().cpu())
        return torch.cat(outputs)
