"""Data-free training latents: the uncompressed model's own samples for the calibration conditions, cached.

The clean final latents ``x0`` of the teacher's sampling loop (:func:`compressdit.models.sampling.sample`) stand
in for a dataset; the trainers noise them with the usual objective. Generating costs ``images x steps`` denoising
steps (twice the batch with guidance), so every batch of samples is saved to the cache (safetensors, written
atomically) under a key of the teacher's weight files and the settings: a rerun samples nothing, a stopped run
resumes at the first missing batch, and the prune and distill stages of one recipe share the samples.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from compressdit.calibration.sets import load_conditions, resolve_set
from compressdit.config_base import StrictConfig
from compressdit.distill.data import labelled_data
from compressdit.distill.source_registry import DATA_SOURCES, DataContext, DataSource, files_digest
from compressdit.errors import ConfigError
from compressdit.models.sampling import sample
from compressdit.progress import progress_bar


@dataclass
class TeacherDataConfig(StrictConfig):
    """Data-free distillation data (teacher samples as the training set, as in Luhman & Luhman 2021,
    arXiv 2101.02388). YAML::

        data: {source: teacher, images: 1024, set: null, steps: 20, guidance: 4.0, seed: 0, batch_size: 64}

    ``images`` samples of the calibration ``set``'s class ids or prompts (default: the model's shipped set,
    cycled when shorter), sample ``i`` from noise seeded with ``seed + i``, ``steps`` steps of the pipeline's
    scheduler with classifier-free ``guidance``, ``batch_size`` samples per batch (and per cache file).
    """

    images: int = 1024
    set: str | None = None
    steps: int = 20
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 64

    def validate(self, where: str) -> None:
        self.require_positive(where, "images", "steps", "batch_size")
        if self.guidance < 1.0:
            raise ConfigError(f"{where}.guidance: must be >= 1 (1 = no guidance), got {self.guidance}")


def cache_folder(config: TeacherDataConfig, context: DataContext, set_path: Path) -> Path:
    """The cache folder of these settings: teacher weights, family, set contents, sampler settings, and the prompt
    encoder's key when the model has its own text encoder.

    ``images`` is not part of the key: sample ``i`` does not depend on how many are drawn, so a larger run
    reuses the batches of a smaller one with the same batch size.
    """
    scheduler = context.scheduler
    settings = {"teacher": files_digest(context.teacher_folder), "family": context.adapter.family,
                "set": hashlib.sha1(set_path.read_bytes()).hexdigest(),
                "scheduler": [type(scheduler).__name__, dict(scheduler.config)],
                **{k: v for k, v in config.to_dict().items() if k not in ("images", "set")}}
    if context.prompt_encoder is not None:  # the zoo's MiniLM models have none: their keys stay as they were
        settings["prompt_encoder"] = context.prompt_encoder.key
    key = json.dumps(settings, sort_keys=True, default=str)
    return context.cache_dir / "distill-data" / f"teacher-{hashlib.sha1(key.encode()).hexdigest()[:16]}"


def _write_atomically(path: Path, latents: torch.Tensor, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"latents": latents.detach().float().cpu().contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def teacher_latents(config: TeacherDataConfig, context: DataContext, conditions: list,
                    folder: Path) -> tuple[torch.Tensor, int, float]:
    """Final latents of the teacher for ``conditions`` (batches from the cache where present); also how many
    samples were drawn now and the seconds it took. The teacher is loaded only when a batch is missing."""
    folder.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(conditions), config.batch_size)
    parts = {start: folder / f"part-{start:07d}-{min(start + config.batch_size, len(conditions)):07d}.safetensors"
             for start in starts}
    missing = [start for start in starts if not parts[start].exists()]
    teacher = home = None
    started = time.perf_counter()
    try:
        with progress_bar("teacher samples (data-free)", total=len(conditions),
                          completed=len(conditions) - sum(min(config.batch_size, len(conditions) - s) for s in missing),
                          quiet=context.quiet) as bar:
            for start in missing:
                if teacher is None:
                    teacher = context.load_teacher()
                    home = next(teacher.parameters()).device
                    teacher.to("cuda" if torch.cuda.is_available() else home)
                chunk = conditions[start:start + config.batch_size]
                latents = sample(context.adapter, teacher, chunk, context.scheduler, steps=config.steps,
                                 guidance=config.guidance, seed=config.seed + start, batch_size=config.batch_size,
                                 prompt_encoder=context.prompt_encoder)
                if not torch.isfinite(latents).all():
                    raise ConfigError(f"the teacher's samples {start}..{start + len(chunk) - 1} are not finite; "
                                      "check the model and scheduler, or use data: {source: images, path: ...}")
                _write_atomically(parts[start], latents, {"first_seed": str(config.seed + start)})
                bar.update(len(chunk))
    finally:
        if teacher is not None:
            teacher.to(home)
    seconds = time.perf_counter() - started
    latents = torch.cat([load_file(str(parts[start]))["latents"] for start in starts])
    return latents, sum(min(config.batch_size, len(conditions) - s) for s in missing), seconds


def _load_teacher_data(config: TeacherDataConfig, context: DataContext):
    kind = context.adapter.condition_kind
    set_path = resolve_set(config.set, kind)
    conditions = load_conditions(set_path, kind, limit=config.images)
    folder = cache_folder(config, context, set_path)
    latents, drawn, seconds = teacher_latents(config, context, conditions, folder)
    per_sample = config.steps * (2 if config.guidance != 1.0 else 1)
    cost = (f"{config.images} samples x {config.steps} steps = {config.images * config.steps:,} denoising steps"
            f"{' (x2 batch for guidance)' if config.guidance != 1.0 else ''}")
    done = (f"{drawn} drawn now ({drawn * per_sample:,} sample-forwards, {seconds:.1f} s), "
            f"{config.images - drawn} reused from the cache" if drawn else "all reused from the cache")
    note = (f"teacher samples (data-free): {config.images} clean latents of the uncompressed model for the "
            f"{kind} conditions of {set_path.name} (guidance {config.guidance}); cost {cost}; {done} "
            f"({folder})")
    return labelled_data(latents, conditions, context.adapter.null_conditions(1)[0], note)


DATA_SOURCES.add("teacher", DataSource(TeacherDataConfig, _load_teacher_data))
