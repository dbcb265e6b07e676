"""``calibrate``: run the real sampling loop on a calibration set and record activation statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import PartialState
from accelerate.utils import broadcast_object_list

from compressdit.calibration.distributed import rank_batches, reduce_max, reduce_sums
from compressdit.calibration.sets import load_conditions, resolve_set, set_bytes
from compressdit.calibration.stats import ActivationStats, cache_key, capture_input_absmax, stats_from_recorder
from compressdit.config_base import StrictConfig
from compressdit.models.driven import configure_call
from compressdit.models.sampling import initial_latents, sample
from compressdit.progress import progress_bar
from compressdit.stages.base import STAGES, PipelineState, Stage


@dataclass
class CalibrateConfig(StrictConfig):
    """Calibration run. YAML: ``- calibrate: {set: fmnist-classes, samples: 32, steps: 10, guidance: 4.0}``

    ``set`` is a shipped set name or a local ``.jsonl`` / ``.parquet`` / ``.csv`` file or folder of them with a
    ``prompt`` (text models) or ``class_id`` (class models) column (``--calib`` on the CLI); ``samples``
    conditions are drawn from it (cycled). Prompts go through the model's prompt encoder. Statistics are cached
    on disk per model + settings (+ prompt encoder). ``size`` (pixels, square) and ``call`` (extra keywords of the
    pipeline's ``__call__``, e.g. ``{num_frames: 49}``): for a pipeline that compressdit samples through its own
    ``__call__`` (families without an adapter, :mod:`compressdit.models.driven`; default: the pipeline's own
    settings); adapters sample at their config's latent size and refuse both.
    """

    set: str | None = None
    samples: int = 32
    steps: int = 10
    guidance: float = 4.0
    seed: int = 1234
    batch_size: int = 32
    size: int | None = None
    call: dict | None = None

    def validate(self, where: str) -> None:
        self.require_positive(where, "samples", "steps", "batch_size")
        if self.size is not None:
            self.require_positive(where, "size")


def run_calibration(state: PipelineState, config: CalibrateConfig) -> ActivationStats:
    adapter, model = state.adapter, state.model
    configure_call(adapter, config.size, config.call, "calibrate")
    path = resolve_set(config.set, adapter.condition_kind)
    conditions = load_conditions(path, adapter.condition_kind, limit=config.samples)
    state.calibration_conditions = conditions
    state.calibration_config = config
    encoder = state.source.prompt_encoder
    settings = {**config.to_dict(), "set": str(path), "set_bytes": set_bytes(path), "stats": "absmax+meansq"}
    if encoder is not None:  # models without their own encoder keep their cache keys
        settings["prompt_encoder"] = encoder.key
    if adapter.drives_pipeline:
        settings["pipeline"] = adapter.key
    cache: Path | None = None
    if state.cache_dir is not None:
        cache = state.cache_dir / "calibration" / f"{cache_key(model, settings)}.safetensors"
        if cache.exists():
            return ActivationStats.load(cache)
    scheduler = state.source.scheduler or adapter.scheduler(model)
    layers = adapter.linear_layers(model)
    timesteps: list[int] = []
    ranks = PartialState()
    batches = rank_batches(len(conditions), config.batch_size, ranks)  # all of them in a single process
    with capture_input_absmax(model, list(layers)) as recorder, \
            progress_bar("calibrate", total=config.steps * len(batches), quiet=state.quiet) as bar:
        def on_step(i, t, latents, prediction):
            if len(timesteps) < config.steps:
                timesteps.append(int(t) if float(t).is_integer() else round(float(t), 6))
            recorder.step = i + 1 if i + 1 < config.steps else 0
            bar.update(1)

        recorder.step = 0
        if ranks.num_processes == 1:
            sample(adapter, model, conditions, scheduler, steps=config.steps, guidance=config.guidance,
                   seed=config.seed, on_step=on_step, batch_size=config.batch_size, prompt_encoder=encoder)
        else:  # this rank's batches, from the latents one process draws for them (a driven pipeline: its seeds)
            latents = None if adapter.drives_pipeline else initial_latents(adapter, model, len(conditions),
                                                                           config.seed)
            for start, end in batches:
                sample(adapter, model, conditions[start:end], scheduler, steps=config.steps,
                       guidance=config.guidance, seed=config.seed + start,
                       latents=None if latents is None else latents[start:end], on_step=on_step,
                       batch_size=config.batch_size, prompt_encoder=encoder)
    if ranks.num_processes > 1:
        widths = {n: m.in_features for n, m in layers.items()}
        recorder.per_step = reduce_max(recorder.per_step, widths, config.steps, ranks)
        recorder.squares = reduce_sums(recorder.squares, widths, config.steps, ranks)
        timesteps = broadcast_object_list([timesteps])[0]  # rank 0 always sampled the first batch
    stats = stats_from_recorder(recorder, timesteps)
    if cache is not None and ranks.is_main_process:
        stats.save(cache)
    return stats


class CalibrateStage(Stage):
    config_class = CalibrateConfig
    runs_driven = True
    runs_quantized = True

    def run(self, state: PipelineState, config: CalibrateConfig) -> None:
        started = time.perf_counter()
        state.calibration = run_calibration(state, config)
        state.timings["calibrate_s"] = round(time.perf_counter() - started, 2)


STAGES.add("calibrate", CalibrateStage())
