"""Streaming quantization: a model larger than memory, one transformer block in memory at a time.

The model is built on the ``meta`` device from its ``config.json`` (accelerate's ``init_empty_weights``); the
layer plan comes from the recipe's quantize stages (methods whose ``layer_plan`` says each layer is quantized from
its own weights and per-channel input statistics alone). A calibrate stage runs first, on the skeleton with one block
read at a time (:mod:`compressdit.calibration.streamed`), giving the in-memory statistics. Then, for the modules outside the blocks and for each block in turn: its tensors are read
from the source's safetensors shards (:class:`~compressdit.io.shards.LazyWeights`), loaded into the skeleton in the
dtype an in-memory load gives, quantized by the same ``quantize_layers`` as the in-memory path, cast as
``save_pretrained`` would cast them, handed to a :class:`~compressdit.io.shards.ShardWriter` and dropped back to
``meta``. Output tensors, shard layout, index and ``config.json`` equal what the in-memory path writes with the same
``max_shard_size``. With ``device="cuda"`` each unit is read onto the GPU, calibrated and quantized there (one block
of weights and its activations in device memory: a 24 GB card compresses a 12B model) and its outputs come back to
the CPU as they are written. GPTQ rounding streams too (:mod:`compressdit.streaming_gptq`: block inputs recorded to a
temporary folder during the calibration, each block's Hessians collected by replaying them). Recipes that need block
reconstruction (AdaRound) or joint decisions over layers (mixed precision, codebooks, format search) are refused.

The orchestrator (:func:`compressdit.pipeline.run_recipe`) streams when asked (``--stream``) or when the source
would not fit in the memory budget (:func:`streaming_reason`).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil
import torch
from accelerate import PartialState
from torch import nn

from compressdit.calibration.stats import ActivationStats
from compressdit.calibration.streamed import streamed_calibration
from compressdit.errors import CalibrationError, CheckpointError, ConfigError
from compressdit.io.checkpoint import stored_float_dtype, verify_safetensors
from compressdit.io.diffusers_quantizer import attach_quantizer
from compressdit.io.shards import LazyWeights, ShardWriter, expected_tensors, plan_shards
from compressdit.io.sources import ModelSource, load_source, transformer_class
from compressdit.memory import release_free_heap
from compressdit.models import ModelAdapter, adapter_for
from compressdit.progress import track
from compressdit.quant import viditq  # noqa: F401  (registers the method)
from compressdit.quant.context import QuantContext
from compressdit.quant.methods import METHODS
from compressdit.quant.rounding import ROUNDINGS
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import build_empty_layers, check_plan_fits, quantize_layers
from compressdit.quant.gptq_calibration import hessian_layers
from compressdit.recipe import Recipe
from compressdit.streaming_gptq import StreamedGPTQ, cache_budget

# shards of the streamed output: each is held in memory until its last tensor is produced (512 MB: room, within a
# 6 GB peak, for GPTQ on a FLUX-size single block: its 0.6 GB of weights and 3 x 0.9 GB of Hessian work)
STREAM_SHARD_SIZE = "512MB"


def in_memory_bytes(folder: Path) -> int:
    """Bytes the checkpoint's float tensors take once loaded the in-memory way (float32, as ``from_pretrained``
    without ``torch_dtype`` loads them)."""
    return LazyWeights(folder).float_numel() * 4


def streaming_reason(folder: Path, stream: bool, max_memory: int | None) -> str | None:
    """Why this run streams (``--stream``, or the loaded model would exceed ``max_memory``, by default the memory
    available now), or None to compress in memory."""
    if stream:
        return "streamed (--stream)"
    if not any(Path(folder).glob("*.safetensors")):
        return None  # loading in memory reports what is wrong with the folder
    budget = max_memory if max_memory is not None else psutil.virtual_memory().available
    need = in_memory_bytes(folder)
    if need <= budget:
        return None
    return (f"streamed: the model needs {need / 1e9:.1f} GB in memory (float32), more than the "
            f"{'--max-memory' if max_memory is not None else 'available memory'} of {budget / 1e9:.1f} GB")


def skeleton(folder: Path) -> nn.Module:
    """The model ``folder/config.json`` describes, with every parameter on ``meta`` (no memory)."""
    from accelerate import init_empty_weights

    model_class = transformer_class(folder)
    config = model_class.load_config(folder)
    if "quantization_config" in config:
        raise CheckpointError(f"{folder} is already compressed (its config.json has a quantization_config); "
                              "streaming quantizes float checkpoints")
    with init_empty_weights():
        model = model_class.from_config(config).eval()
    model.register_to_config(_name_or_path=str(folder))  # as from_pretrained records it
    return model


_NOT_STREAMED = {
    "evaluate": "it samples with the whole model; pass --no-eval and evaluate the checkpoint where it fits",
}
# what a layer's rounding needs beyond the per-channel input statistics and input Hessians a streamed run collects
_ROUNDING_NEEDS = (("reconstructs_blocks", "block reconstruction from cached block inputs (AdaRound), which "
                                           "streaming does not run"),)


@dataclass
class StreamPlan:
    """The recipe's quantize stages as one per-layer plan, and its calibrate stage's config (None: none)."""

    specs: dict[str, LinearQuantSpec]
    calibrate: Any = None


def streamed_plan(recipe: Recipe, model: nn.Module, adapter: ModelAdapter) -> StreamPlan:
    """The per-layer plan and calibration of ``recipe``; raise for what streaming cannot run: stages other than
    one calibrate stage followed by quantize stages, methods that need more than per-channel input statistics and
    input Hessians (block reconstruction) or quantize layers jointly (mixed precision, codebooks), and Hessians of a
    partly quantized model (GPTQ in a later quantize stage)."""
    plan: dict[str, LinearQuantSpec] = {}
    calibrate = None
    for stage in recipe.stages:
        if stage.name == "calibrate" and calibrate is None and not plan:
            calibrate = stage.config
            continue
        if stage.name != "quantize":
            why = _NOT_STREAMED.get(stage.name, "streaming runs one calibrate stage, then quantize stages; run it "
                                                "where the model fits in memory")
            raise ConfigError(f"recipe {recipe.name}: stage {stage.name!r} cannot stream: {why}")
        handler = METHODS.get(stage.config.method)
        if handler.needs_calibration(stage.config.options) and calibrate is None:
            raise CalibrationError(f"recipe {recipe.name}: method {stage.config.method!r} as configured needs a "
                                   "calibrate stage before quantize (channel balancing and static scales use its "
                                   "statistics)")
        layer_plan = handler.layer_plan(model, stage.config.options, QuantContext(adapter=adapter))
        if layer_plan is None:
            raise ConfigError(f"recipe {recipe.name}: method {stage.config.method!r} as configured quantizes layers "
                              "jointly (mixed precision, codebooks, format search) and cannot stream; run it where "
                              "the model fits in memory")
        earlier = bool(plan)  # layers an earlier quantize stage quantized
        for name, spec in layer_plan.items():
            if spec is None:
                continue
            rounding = ROUNDINGS.get(spec.rounding)
            for flag, what in _ROUNDING_NEEDS:
                if getattr(rounding, flag):
                    raise CalibrationError(f"recipe {recipe.name}: {name} (rounding {spec.rounding!r}) needs {what}; "
                                           "run it where the model fits in memory, or stream a recipe that rounds "
                                           "with rtn or gptq (w4a16, gptq-w4a16, gptq-w4a8, rtn-w4a16, rtn-w8a8, "
                                           "w8a8)")
            if earlier and rounding.needs_hessian:
                raise ConfigError(f"recipe {recipe.name}: {name} (rounding {spec.rounding!r}) is in a quantize stage "
                                  "after another one, so in memory its Hessian comes from the partly quantized "
                                  "model, while streaming replays the float blocks; merge the quantize stages")
            if name in plan:
                raise ConfigError(f"{name} is already quantized ({plan[name].label}); a recipe quantizes a layer once")
            plan[name] = spec
    check_plan_fits(model, plan)
    return StreamPlan(plan, calibrate)


@dataclass
class StreamResult:
    """The quantized skeleton (``meta`` tensors: module structure for the model card), specs and notes."""

    model: nn.Module
    adapter: ModelAdapter
    specs: dict[str, LinearQuantSpec]
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calibration: ActivationStats | None = None


def _units(model: nn.Module, adapter: ModelAdapter) -> list[tuple[str, nn.Module]]:
    """What is materialised at once: everything outside the blocks (``""``), then each block in order."""
    return [("", model)] + list(adapter.blocks(model))


def _in_unit(name: str, prefix: str, block_prefixes: list[str]) -> bool:
    """Whether tensor or module ``name`` belongs to the unit ``prefix`` (``""``: outside every block)."""
    if prefix:
        return name.startswith(prefix + ".")
    return not any(name.startswith(p + ".") for p in block_prefixes)


@torch.no_grad()
def stream_quantize(recipe: Recipe, source: Path, target: Path, quiet: bool = False,
                    max_shard_size: int | str = STREAM_SHARD_SIZE,
                    parts: Callable[[nn.Module], ModelSource] | None = None, write: bool = True,
                    device: torch.device | str = "cpu", scratch: Path | None = None,
                    max_cache: int | None = None) -> StreamResult:
    """Quantize the float checkpoint in ``source`` with ``recipe`` into ``target``, block by block (module doc).

    ``parts(skeleton)``: the model source around the skeleton that calibration samples with (scheduler, prompt
    encoder; default: ``source`` as a bare transformer folder). ``write=False``: calibrate only (a rank other than 0
    under ``accelerate launch``; nothing is written). ``device``: where blocks are calibrated and quantized.
    GPTQ's block-input cache goes to a temporary folder in ``scratch`` (default: ``target``'s parent), at most
    ``max_cache`` bytes (default: the free space less the output)."""
    started = time.perf_counter()
    verify_safetensors(source)  # headers and sizes: a truncated shard fails now, not after an hour
    weights = LazyWeights(source)
    model = skeleton(source)
    adapter = adapter_for(model)
    stream_plan = streamed_plan(recipe, model, adapter)
    plan = stream_plan.specs
    float_dtype = stored_float_dtype(source)
    # the output's layout, dtypes and metadata: what save_pretrained derives from the quantized model
    quantized = copy.deepcopy(model)
    build_empty_layers(quantized, plan)
    config = attach_quantizer(quantized, plan)
    config.record_float_dtype(float_dtype)
    out_state, metadata = quantized.hf_quantizer.get_state_dict_and_metadata(quantized.state_dict())
    expected = expected_tensors(out_state)
    layout = plan_shards(out_state, max_shard_size)
    del quantized, out_state
    if hessian_layers(plan) and PartialState().num_processes > 1:
        raise ConfigError(f"recipe {recipe.name}: streamed GPTQ records every block's calibration inputs in one "
                          "process; run it without accelerate launch / torchrun")
    with contextlib.ExitStack() as stack:  # GPTQ's block-input cache is removed on exit, even after an error
        gptq = None
        if hessian_layers(plan) and write:
            scratch = Path(scratch) if scratch is not None else Path(target).resolve().parent
            budget = cache_budget(scratch, int(layout.metadata["total_size"]), Path(target), max_cache)
            gptq = stack.enter_context(StreamedGPTQ(model, adapter, plan, stream_plan.calibrate, scratch, budget,
                                                    device))
        source_state = model.state_dict()
        source_names = list(source_state)
        unused = sorted(set(weights.names()) - set(source_names))
        if unused:
            raise CheckpointError(f"{source}: the weights have tensor {unused[0]} that config.json does not use "
                                  f"({len(unused)} unused): config.json and weights do not match")
        timings, notes, stats = {}, [], None
        if stream_plan.calibrate is not None:
            calibrated = time.perf_counter()
            parts = parts or (lambda skeleton_: load_source(str(source), transformer=skeleton_))
            with gptq.calibrating() if gptq is not None else contextlib.nullcontext():
                stats, streamer, _ = streamed_calibration(parts(model), adapter, weights, stream_plan.calibrate,
                                                          quiet, device)
            timings["calibrate_s"] = round(time.perf_counter() - calibrated, 2)
            notes.append(f"calibrated on {stream_plan.calibrate.samples} samples x {stream_plan.calibrate.steps} "
                         f"steps with blocks read from the shards as they ran ({streamer.loads} block reads, at most "
                         f"{streamer.peak} block{'s' * (streamer.peak != 1)} in memory at once)")
        if not write:
            return StreamResult(model, adapter, plan, notes, timings, stats)
        input_absmax = QuantContext(adapter=adapter, calibration=stats).input_absmax(plan)
        units = _units(model, adapter)
        block_prefixes = [p for p, _ in units if p]
        with ShardWriter(target, layout, expected, metadata) as writer:
            for prefix, module in track(units, "streaming blocks", quiet=quiet):
                names = [n for n in source_names if _in_unit(n, prefix, block_prefixes)]
                weights.load_into(module, names, source_state, prefix, strict=bool(prefix), device=device)
                strip = len(prefix) + 1 if prefix else 0
                prebuilt = gptq.rounded(prefix, lambda n: _in_unit(n, prefix, block_prefixes), input_absmax) \
                    if gptq is not None else None
                quantize_layers(model, {n: s for n, s in plan.items() if _in_unit(n, prefix, block_prefixes)},
                                input_absmax, prebuilt)
                del prebuilt
                produced = [n for n in expected if _in_unit(n, prefix, block_prefixes)]
                state = module.state_dict()
                writer.add({n: state[n[strip:]].to(expected[n][1]) for n in produced})
                del state
                _drop(module, block_prefixes if not prefix else [])
                release_free_heap()  # this unit's temporaries: free heap pages still count in the resident set
        attach_quantizer(model, plan).record_float_dtype(float_dtype)
        model.save_config(target)
        verify_safetensors(target)
        files = len(layout.filename_to_tensors)
        notes.insert(0, f"streamed: {len(units) - 1} blocks quantized one at a time from {source}, written as "
                        f"{files} shard{'s' * (files != 1)}; no reload check (the model is not held in memory)")
        if gptq is not None:
            notes.append(gptq.note(stream_plan.calibrate))
        timings["quantize_s"] = round(time.perf_counter() - started, 2)
        return StreamResult(model, adapter, plan, notes, timings, stats)


def _drop(module: nn.Module, skip_prefixes: list[str]) -> None:
    """Move ``module``'s tensors to ``meta`` (freeing them), leaving the stacks named by ``skip_prefixes`` alone."""
    if not skip_prefixes:
        module.to("meta")
        return
    stacks = {p.rpartition(".")[0] for p in skip_prefixes}
    for name, child in module.named_children():
        if name not in stacks:
            child.to("meta")
    for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        setattr(module, name, nn.Parameter(tensor.to("meta"), requires_grad=False)
                if isinstance(tensor, nn.Parameter) else tensor.to("meta"))
