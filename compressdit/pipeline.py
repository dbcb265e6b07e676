"""The only orchestrator: load -> stages -> checkpoint (temp folder, renamed at the end) -> report; and the
``distill`` command's load -> train -> checkpoint. Stages transform the model; only this module writes outputs."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from accelerate import PartialState
from torch import nn

from compressdit.cache import default_cache_dir
from compressdit.calibration.sets import load_conditions, resolve_set
from compressdit.errors import CheckpointError, ConfigError
from compressdit.evaluate.engine import Entry
from compressdit.evaluate.peers import PEERS, apply_peer
from compressdit.io.checkpoint import atomic_output, check_output, copy_pipeline_parts, folder_bytes, stored_float_dtype
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.io.model_card import write_model_card
from compressdit.io.save import save_in_dtype
from compressdit.io.sources import TRANSFORMER_SUBFOLDER, ModelSource, load_source, load_transformer, resolve_path
from compressdit.models import adapter_for
from compressdit.models.driven import configure_call
from compressdit.models.sampling import initial_latents, sample
from compressdit.quant.transform import quantized_modules
from compressdit.recipe import Recipe, load_recipe
from compressdit.stages import STAGES, PipelineState
from compressdit.stages.calibrate import CalibrateConfig
from compressdit.stages.distill import DistillStageConfig, run_distillation
from compressdit.stages.evaluate import EvaluateConfig, reference_named_layers, run_evaluation
from compressdit.streaming import stream_quantize, streaming_reason


@torch.no_grad()
def _reload_check(state: PipelineState, folder: Path) -> str:
    """Compare the in-memory model with the checkpoint reloaded by stock diffusers; return the report note.

    Outputs are compared on the adapter's synthetic conditions (seeded, of the config's shapes: no text encoder
    needed); where the adapter cannot build the model's inputs (generic adapter), the reloaded state dict is
    compared with the in-memory one tensor by tensor, and every quantized module's spec with its twin.
    """
    reloaded = load_transformer(folder)
    adapter = state.adapter
    cond = adapter.synthetic_conditioning(state.model, 2, seed=99)
    if cond is None:
        ours, theirs = state.model.state_dict(), reloaded.state_dict()
        differ = sorted(set(ours) ^ set(theirs)) or [k for k in ours if not torch.equal(
            ours[k], theirs[k].to(ours[k].dtype) if ours[k].is_floating_point() else theirs[k])]
        specs = {n: m.spec for n, m in quantized_modules(state.model).items()}
        if not differ and specs != {n: m.spec for n, m in quantized_modules(reloaded).items()}:
            differ = ["quantized modules or their specs"]
        if differ:
            raise CheckpointError(f"reloaded checkpoint differs from the compressed model in {differ[0]} "
                                  f"({len(differ)} differences)")
        return (f"stock diffusers reload check: all {len(ours)} tensors equal (no output comparison: "
                f"compressdit cannot build {type(state.model).__name__}'s inputs)")
    x = initial_latents(adapter, state.model, 2, seed=99)
    t = torch.tensor([500])
    diff = (adapter.predict(state.model, x, t, cond) - adapter.predict(reloaded, x, t, cond)).abs().max().item()
    if not diff <= 1e-5:
        raise CheckpointError(f"reloaded checkpoint differs from the compressed model (max |diff| {diff:.3g})")
    return f"stock diffusers reload check: max |output difference| = {diff:.2g}"


@torch.no_grad()
def _round_to(model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """Round the float tensors ``save_in_dtype`` casts to ``dtype``, in place: trained weights (distillation)
    then equal the checkpoint's, and later stages evaluate what was saved. Packed quantized tensors stay."""
    if dtype is None or dtype == torch.float32:
        return
    packed = {f"{n}.{t}" for n, m in quantized_modules(model).items() for t in m.quantized_tensors}
    # saved tensors only: non-persistent buffers (e.g. sin-cos position tables) are rebuilt in fp32 on load
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and name not in packed:
            tensor.data.copy_(tensor.data.to(dtype))


def save_checkpoint(state: PipelineState, recipe: Recipe) -> None:
    out = state.workdir
    folder = out / TRANSFORMER_SUBFOLDER if state.source.is_pipeline else out
    if state.source.is_pipeline:
        copy_pipeline_parts(state.source.folder, out)
    if state.quant_specs:
        attach_quantizer(state.model, state.quant_specs)
    dtype = stored_float_dtype(state.source.transformer_folder)
    _round_to(state.model, dtype)
    save_in_dtype(state.model, folder, dtype)
    (out / "compressdit_recipe.yaml").write_text(recipe.dump())
    state.notes.append(_reload_check(state, folder))
    skipped = sorted(n for n in state.adapter.linear_layers(state.model) if n not in state.quant_specs)
    if skipped and state.quant_specs:
        state.notes.append(f"{len(skipped)} linear layers kept in full precision: " + ", ".join(skipped[:12])
                           + (" ..." if len(skipped) > 12 else ""))
    rows = [[name, spec.label, round(spec.bits_per_weight, 3), spec.a_bits or 16,
             spec.group_size or ("layer codebook" if spec.vector_dim else "channel")]
            for name, spec in sorted(state.quant_specs.items())]
    if rows:
        state.tables.append({"title": "per-module scheme", "header": ["module", "scheme", "w bits", "a bits", "scales / codebook"],
                             "rows": rows})


def check_device(device: str, available: bool = True) -> None:
    """Raise unless ``device`` names a torch device (and, with ``available``, one this process can use), before any
    work is done."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if parsed.type == "cpu" or not available:
        return
    backend = getattr(torch, parsed.type, None)
    if backend is None or not backend.is_available():
        raise ConfigError(f"--device {device}: torch {torch.__version__} sees no {parsed.type} device here; leave "
                          "--device out to compress on the CPU")
    if parsed.index is not None and parsed.index >= backend.device_count():
        raise ConfigError(f"--device {device}: only {backend.device_count()} {parsed.type} device(s) "
                          f"(0..{backend.device_count() - 1})")


def check_float(model: str, transformer, stages: list[str]) -> None:
    """Raise when ``transformer`` was loaded already quantized and one of ``stages`` trains or reshapes float
    weights (packed integer codes have no gradient: they failed deep inside torch)."""
    quantized = quantized_modules(transformer)
    if quantized and stages:
        raise ConfigError(f"{model} is already quantized ({len(quantized)} layers) and {stages[0]} trains or reshapes "
                          "float weights: run it on the float model, then quantize its output")


def run_recipe(recipe: Recipe, model: str, out: Path, overwrite: bool = False, quiet: bool = False,
               calib: str | None = None, text_encoder: str | None = None,
               embeddings: str | None = None, stream: bool = False, max_memory: int | None = None,
               device: str = "cpu", max_cache: int | None = None) -> PipelineState:
    """Compress ``model`` with ``recipe`` into ``out``; nothing is left at ``out`` if any step fails.

    Prompts go through ``embeddings`` (a file of precomputed embeddings), else ``text_encoder`` (a pipeline
    folder), else the model folder's own text encoders (a pipeline), else MiniLM (reference models).
    With ``stream``, or when the loaded model would not fit in ``max_memory`` bytes (default: the memory available),
    the model is quantized block by block from its shards (:mod:`compressdit.streaming`), on ``device``, with at most
    ``max_cache`` bytes of GPTQ block inputs cached on disk next to ``out``."""
    inputs = (model, text_encoder, embeddings, calib)
    check_output(out, overwrite, inputs)  # before loading: a taken output folder should not cost a model load
    check_device(device, available=False)
    ranks = PartialState()
    if ranks.num_processes > 1 and any(STAGES.get(s.name).needs_checkpoint for s in recipe.stages):
        raise ConfigError(f"recipe {recipe.name}: under accelerate launch / torchrun only the calibration is split "
                          "over processes; pass --no-eval and evaluate the checkpoint in one process")
    folder = resolve_path(model)
    is_pipeline = (folder / TRANSFORMER_SUBFOLDER / "config.json").exists()
    if calib is not None:
        for stage in recipe.stages:
            if hasattr(stage.config, "set"):
                stage.config.set = calib
    reason = streaming_reason(folder / TRANSFORMER_SUBFOLDER if is_pipeline else folder, stream, max_memory)
    if reason is None and torch.device(device).type != "cpu":
        raise ConfigError(f"--device {device} applies to streamed runs (one block on the device at a time); add "
                          "--stream, or leave --device out to compress in memory on the CPU")
    check_device(device)  # a streamed run's device is one this process can use
    if reason is not None:
        return run_streamed(recipe, model, out, overwrite, quiet, reason,
                            lambda skeleton: load_source(model, text_encoder=text_encoder, embeddings=embeddings,
                                                         cache_dir=default_cache_dir(), transformer=skeleton),
                            device, max_cache)
    source = load_source(model, text_encoder=text_encoder, embeddings=embeddings, cache_dir=default_cache_dir())
    check_float(model, source.transformer, [s.name for s in recipe.stages if not STAGES.get(s.name).runs_quantized])
    adapter = adapter_for(source.transformer, source.folder if source.is_pipeline else None)
    if adapter.drives_pipeline and not all(STAGES.get(s.name).runs_driven for s in recipe.stages):
        raise adapter.cannot_sample()  # before the calibration, not after it
    if not ranks.is_main_process:
        return _helper_rank(recipe, PipelineState(source=source, adapter=adapter, model=source.transformer,
                                                  workdir=Path(out), reference_spec=model, quiet=True,
                                                  cache_dir=default_cache_dir(), recipe_name=recipe.name))
    with atomic_output(out, overwrite=overwrite, keep=inputs) as workdir:
        state = PipelineState(source=source, adapter=adapter, model=source.transformer, workdir=workdir,
                              reference_spec=model, quiet=quiet, cache_dir=default_cache_dir(),
                              recipe_name=recipe.name)
        saved = False
        started = time.perf_counter()
        for stage in recipe.stages:
            handler = STAGES.get(stage.name)
            if handler.needs_checkpoint and not saved:
                save_checkpoint(state, recipe)
                saved = True
            if handler.needs_baseline and getattr(stage.config, "baseline", None):
                state.baseline = build_baseline(stage.config.baseline, state.reference(),
                                                reference_named_layers(state), quiet, default_cache_dir(),
                                                state.calibration_config)
            handler.run(state, stage.config)
        if not saved:
            save_checkpoint(state, recipe)
        write_model_card(workdir, display_path=str(out), recipe=recipe, reference_name=model,
                         reference_folder=source.folder, model=state.model, report=state.report)
        state.timings["total_s"] = round(time.perf_counter() - started, 2)
    state.workdir = Path(out)
    return state


def _helper_rank(recipe: Recipe, state: PipelineState) -> PipelineState:
    """A rank other than 0 under ``accelerate launch``: the stages up to the last calibrate stage (its share of the
    calibration; the stages before it shape the model it samples), nothing written; rank 0 does the rest."""
    calibrating = [i for i, stage in enumerate(recipe.stages) if stage.name == "calibrate"]
    for stage in recipe.stages[:calibrating[-1] + 1 if calibrating else 0]:
        STAGES.get(stage.name).run(state, stage.config)
    ranks = PartialState()
    state.notes.append(f"rank {ranks.process_index} of {ranks.num_processes}: calibrated its share; rank 0 writes "
                       f"{state.workdir}")
    return state


def run_streamed(recipe: Recipe, model: str, out: Path, overwrite: bool, quiet: bool, reason: str,
                 parts=None, device: str = "cpu", max_cache: int | None = None) -> PipelineState:
    """``run_recipe`` for a model quantized block by block: the checkpoint (with the pipeline's other parts), the
    recipe and the model card are written atomically; nothing is evaluated (see :mod:`compressdit.streaming`).
    ``parts(skeleton)``: the model source calibration samples with (``stream_quantize``)."""
    folder = resolve_path(model)
    is_pipeline = (folder / TRANSFORMER_SUBFOLDER / "config.json").exists()
    transformer = folder / TRANSFORMER_SUBFOLDER if is_pipeline else folder
    if not PartialState().is_main_process:  # its share of the calibration; rank 0 writes
        result = stream_quantize(recipe, transformer, Path(out), quiet, parts=parts, write=False, device=device)
        return PipelineState(source=ModelSource(model, folder, result.model, is_pipeline=is_pipeline),
                             adapter=result.adapter, model=result.model, workdir=Path(out), reference_spec=model,
                             quiet=quiet, recipe_name=recipe.name, calibration=result.calibration,
                             notes=[reason, *result.notes])
    with atomic_output(out, overwrite=overwrite, keep=(model,)) as workdir:
        if is_pipeline:
            copy_pipeline_parts(folder, workdir)
        result = stream_quantize(recipe, transformer, workdir / TRANSFORMER_SUBFOLDER if is_pipeline else workdir,
                                 quiet, parts=parts, device=device, scratch=workdir.parent, max_cache=max_cache)
        (workdir / "compressdit_recipe.yaml").write_text(recipe.dump())
        write_model_card(workdir, display_path=str(out), recipe=recipe, reference_name=model,
                         reference_folder=folder, model=result.model, report=None)
    source = ModelSource(model, folder, result.model, is_pipeline=is_pipeline)
    return PipelineState(source=source, adapter=result.adapter, model=result.model, workdir=Path(out),
                         reference_spec=model, quant_specs=result.specs, timings=result.timings, quiet=quiet,
                         calibration=result.calibration,
                         recipe_name=recipe.name, notes=[reason, *result.notes])


def distill_checkpoint(student: str, teacher: str, out: Path, overrides: dict, workdir: Path | None = None,
                       overwrite: bool = False, quiet: bool = False, cache_dir: Path | None = None,
                       text_encoder: str | None = None, embeddings: str | None = None) -> dict:
    """Distil the model folder ``student`` from ``teacher`` and write it to ``out`` as a folder like the input
    (stock ``save_pretrained``, written atomically). Nothing is written when a time cap stops the run. Prompts go
    through the teacher's prompt encoder: ``embeddings``, else ``text_encoder``'s pipeline, else its own."""
    inputs = (student, teacher, text_encoder, embeddings)
    check_output(out, overwrite, inputs)
    config = DistillStageConfig.from_dict(overrides, "distill")
    cache_dir = cache_dir or default_cache_dir()
    student_src = load_source(student)
    check_float(student, student_src.transformer, ["distill"])
    teacher_src = load_source(teacher, text_encoder=text_encoder, embeddings=embeddings, cache_dir=cache_dir)
    metrics = run_distillation(student_src.transformer, teacher_src, config, cache_dir, quiet,
                               sources=(student_src,), workdir=workdir)
    if not metrics["completed"] or not PartialState().is_main_process:  # one writer under torchrun / accelerate
        return metrics
    with atomic_output(out, overwrite=overwrite, keep=inputs) as tmp:
        folder = tmp / TRANSFORMER_SUBFOLDER if student_src.is_pipeline else tmp
        if student_src.is_pipeline:
            copy_pipeline_parts(student_src.folder, tmp)
        save_in_dtype(student_src.transformer, folder, stored_float_dtype(student_src.transformer_folder))
        summary = {k: v for k, v in metrics.items() if k != "history"}
        (tmp / "compressdit_distill.json").write_text(json.dumps(
            {"student": str(student), "teacher": str(teacher), "config": config.to_dict(), "metrics": summary,
             "history": metrics["history"]}, indent=2))
    return {**metrics, "out": str(out)}


def apply_stages(recipe: Recipe, state: PipelineState, skip: tuple[str, ...] = ("evaluate",)) -> None:
    """Run ``recipe``'s model-transforming stages on ``state`` in memory (nothing is written)."""
    for stage in recipe.stages:
        if stage.name not in skip:
            STAGES.get(stage.name).run(state, stage.config)


def peer_calibration(reference: ModelSource, config: CalibrateConfig | None) -> Callable[[nn.Module], None]:
    """``calibrate(model)`` for a calibrating peer: ``model`` samples the calibration set as a calibrate stage with
    ``config`` does (the candidate's, so both see the same data; the stage's defaults without one)."""
    config = config or CalibrateConfig()
    adapter = adapter_for(reference.transformer)
    conditions = load_conditions(resolve_set(config.set, adapter.condition_kind), adapter.condition_kind,
                                 limit=config.samples)
    scheduler = reference.scheduler or adapter.scheduler(reference.transformer)

    def calibrate(model: nn.Module) -> None:
        configure_call(adapter, config.size, config.call, "calibrate")
        with torch.no_grad():
            sample(adapter, model, conditions, scheduler, steps=config.steps, guidance=config.guidance,
                   seed=config.seed, batch_size=config.batch_size, prompt_encoder=reference.prompt_encoder)

    return calibrate


def build_baseline(name: str, reference: ModelSource, layers: list[str], quiet: bool, cache_dir: Path | None,
                   calibration: CalibrateConfig | None = None) -> Entry:
    """A peer (``bnb-int8``, ...) on the candidate's ``layers`` (a calibrating one, ``modelopt-*``, on the data of
    ``calibration``), or recipe ``name``'s stages run on a copy of the reference; a recipe's bytes are those of its
    checkpoint, written to a temporary folder and measured."""
    model = copy.deepcopy(reference.transformer)
    if name in PEERS:
        peer = PEERS.get(name)
        calibrate = peer_calibration(reference, calibration) if peer.calibrates else None
        return Entry("baseline", apply_peer(model, layers, name, calibrate), f"{name}: {peer.description}",
                     compressed_layers=list(layers))
    recipe = load_recipe(name)
    state = PipelineState(source=reference, adapter=adapter_for(model), model=model, workdir=Path("."),
                          reference_spec=reference.name, quiet=quiet, cache_dir=cache_dir)
    apply_stages(recipe, state)
    if state.quant_specs:
        attach_quantizer(model, state.quant_specs)
    with tempfile.TemporaryDirectory() as tmp:
        save_in_dtype(model, Path(tmp), stored_float_dtype(reference.transformer_folder))
        disk_bytes = folder_bytes(Path(tmp))
    return Entry("baseline", model, f"recipe {recipe.name}", compressed_layers=reference_named_layers(state),
                 disk_bytes=disk_bytes)


def check_same_family(candidate: Entry, reference: ModelSource) -> None:
    """Raise unless ``candidate`` can be compared with ``reference``: the same transformer class on the same latent
    channels (a pruned candidate may differ in depth or width)."""
    ours, theirs = type(candidate.model).__name__, type(reference.transformer).__name__
    channels = [getattr(m.config, "in_channels", None) for m in (candidate.model, reference.transformer)]
    if ours != theirs or channels[0] != channels[1]:
        raise ConfigError(f"candidate {candidate.description} ({ours}, {channels[0]} latent channels) is not a "
                          f"compressed {reference.name} ({theirs}, {channels[1]} latent channels): pass the "
                          "model it was compressed from as --reference")


def evaluate_checkpoint(candidate: Entry, reference: ModelSource, config: EvaluateConfig, out: Path, title: str,
                        quiet: bool = False, inputs: tuple = ()) -> dict:
    """The ``evaluate`` command: candidate vs reference (vs ``config.baseline``), report written atomically (never
    over one of ``inputs``, the command's local paths: :func:`~compressdit.io.checkpoint.check_output`)."""
    check_output(out, True, inputs)  # before the baseline and the samples
    check_same_family(candidate, reference)
    baseline = (build_baseline(config.baseline, reference, candidate.compressed_layers, quiet, default_cache_dir())
                if config.baseline else None)
    with atomic_output(out, overwrite=True, keep=inputs) as tmp:
        return run_evaluation(candidate, reference, config, tmp, title, quiet, default_cache_dir(),
                              baseline=baseline)
