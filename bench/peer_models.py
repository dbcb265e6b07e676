"""Variants of one real-size diffusers transformer for end-to-end CPU benchmarks: float, compressdit, peers.

Every variant is built the same way, block by block from a model on the ``meta`` device: a block (or any other
top-level module) is materialised in fp32 with seeded random weights, then the variant converts it (casts it to
bf16, or replaces its quantized layers), so that no process ever holds the fp32 model beside a quantized one
(peak memory is the variant's own) and every variant starts from the same float weights.

- ``fp32`` / ``bf16``: the float model.
- compressdit recipes (``rtn-w8a8``, ``w8a8``, ``w4a16``, ``w4a8``, ``vq-w3``; the round-to-nearest low-bit ones
  ``fp8``, ``nvfp4``, ``mxfp4``, ``rtn-w4a4`` and grouped ``rtn-w4a8`` on request, outside the default groups): each recipe's layer rules and specs
  (``quantize`` stage) with unit calibration statistics, min-max ranges and nearest rounding (balancing, range and
  GPTQ / AdaRound choices change values, not layouts or kernels) and, for VQ, random codes and codebooks of the recipe's shape (calibrating VQ
  at this size is not part of a speed benchmark); W4A8's mixed precision (a few W8 layers) is not applied.
- peers on the layers compressdit quantizes (embedders and head stay float, as in the recipes): torchao 0.18
  ``quantize_`` with ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig`` and a ``filter_fn``;
  bitsandbytes ``Linear8bitLt`` (LLM.int8) and ``Linear4bit`` NF4 (``compressdit.evaluate.peers``).

Random weights: speed and memory only, never quality.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from real_size_memory import CONFIGS  # noqa: E402

MODELS = {
    "DiT-XL/2 256px": CONFIGS["DiT-XL/2 (256px)"],
    "PixArt-alpha 256px": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
        norm_type="ada_norm_single", use_additional_conditions=False)),
}
TEXT_TOKENS = 120  # PixArt-alpha's T5 prompt length
PEER_LAYERS_RECIPE = "w8a8"  # peers quantize the layers this recipe quantizes (all but embedders and head)

Convert = Callable[[nn.Module, list[str]], nn.Module]  # (materialised unit, its layer names) -> unit


@dataclass(frozen=True)
class Variant:
    note: str
    convert: Convert
    plan_recipe: str | None = PEER_LAYERS_RECIPE  # whose layer plan names the layers to convert
    dtype: torch.dtype = torch.float32


def _float(unit, names):
    return unit


def _bf16(unit, names):
    return unit.to(torch.bfloat16)


def native_gelu(model: nn.Module) -> nn.Module:
    """``model`` with every tanh GELU on compressdit's C GELU (in place), as a quantized copy runs it after its quantized
    projections (``set_module`` swaps it): a float baseline without that difference. Torch's tanh GELU was ~10% of a
    zoo float step on the AVX2 Zen 3 (``e2e_speed_gelu_cpu_zen3_avx2.md``)."""
    from compressdit.quant.native_gelu import swap_activation

    for module in model.modules():
        swap_activation(module, True)
    return model


def _float_native_gelu(unit, names):
    return native_gelu(unit)


def speed_module(linear: nn.Linear, spec, name: str) -> nn.Module:
    """``linear`` quantized as ``spec`` says for a speed benchmark: the layout, kernels and per-call work of the
    recipe's layer, not its values. VQ gets random codes and codebooks seeded by the layer's ``name`` (k-means at
    DiT-XL/2 size is not part of a speed benchmark); other formats unit calibration statistics, min-max ranges and
    nearest rounding (the MSE range search and GPTQ / AdaRound pick other values of the same layout and need
    calibration inputs); twin-log layers the randomized Hadamard, which LRQ's ARS picks per layer from calibration
    (or DuQuant)."""
    from compressdit.quant.formats import FORMATS, clamp_codebook

    if spec.format == "vq":
        spec = clamp_codebook(spec, linear)
        module = FORMATS.get("vq").empty(linear, spec)
        gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        module.load_codes(torch.randint(0, spec.codebook_size, (linear.out_features,
                                                                linear.in_features // spec.vector_dim), generator=gen),
                          torch.randn(spec.codebook_size, spec.vector_dim, generator=gen) * 0.05,
                          torch.ones(linear.out_features) if spec.row_scale else None)
        return module
    spec = dataclasses.replace(spec, w_range="minmax", rounding="rtn", act_order=False)
    if spec.format == "twinlog" and spec.rotation == "none":
        spec = dataclasses.replace(spec, rotation="hadamard")
    return FORMATS.get(spec.format).quantize(linear, spec, torch.ones(linear.in_features))


def _ours(recipe: str) -> Convert:
    def convert(unit, names, specs=None):
        from compressdit.quant.transform import set_module

        for name in names:
            set_module(unit, name, speed_module(unit.get_submodule(name), specs[name], name))
        return unit

    convert.needs_specs = True
    return convert


def _torchao(config_name: str) -> Convert:
    def convert(unit, names):
        import torchao.quantization as tq

        wanted = set(names)
        tq.quantize_(unit, getattr(tq, config_name)(), filter_fn=lambda module, fqn: fqn in wanted)
        return unit

    return convert


def _torchao_bf16(config_name: str) -> Convert:
    """torchao's config on a unit cast to bfloat16 first (its tensor subclasses keep the dtype they were made in)."""
    quantize = _torchao(config_name)

    def convert(unit, names):
        return quantize(unit.to(torch.bfloat16), names)

    return convert


def _bnb(peer: str) -> Convert:
    def convert(unit, names):
        from compressdit.evaluate.peers import apply_peer

        return apply_peer(unit, names, peer)

    return convert


VARIANTS: dict[str, Variant] = {
    "fp32": Variant("float32", _float, None),
    "fp32 (C GELU)": Variant("float32 with compressdit's C tanh GELU, as the quantized variants run it",
                             _float_native_gelu, None),
    "bf16": Variant("bfloat16 weights and activations", _bf16, None, torch.bfloat16),
    **{recipe: Variant(f"compressdit recipe {recipe}", _ours(recipe), recipe)
       for recipe in ("rtn-w8a8", "w8a8", "w4a16", "w4a8", "rtn-w4a8", "vq-w3", "fp8", "nvfp4", "mxfp4", "rtn-w4a4",
                      "lrq-w4a4", "svdquant-w4a4", "svdquant-nvfp4")},
    "torchao int8 weight-only": Variant("torchao quantize_ Int8WeightOnlyConfig", _torchao("Int8WeightOnlyConfig")),
    "torchao int8 dynamic": Variant("torchao quantize_ Int8DynamicActivationInt8WeightConfig (W8A8)",
                                    _torchao("Int8DynamicActivationInt8WeightConfig")),
    # what a bf16 pipeline's user gets: the quantized layers take and give bf16 activations, the rest runs in bf16
    **{f"{recipe} (bf16 model)": Variant(f"compressdit recipe {recipe} in a bfloat16 model", _ours(recipe), recipe,
                                         torch.bfloat16)
       for recipe in ("rtn-w8a8", "w8a8", "w4a16", "vq-w3", "fp8", "nvfp4")},
    "torchao int8 dynamic (bf16 model)": Variant("torchao Int8DynamicActivationInt8WeightConfig in a bfloat16 model",
                                                 _torchao_bf16("Int8DynamicActivationInt8WeightConfig"),
                                                 dtype=torch.bfloat16),
    "torchao int8 weight-only (bf16 model)": Variant("torchao Int8WeightOnlyConfig in a bfloat16 model",
                                                     _torchao_bf16("Int8WeightOnlyConfig"), dtype=torch.bfloat16),
    "bnb int8": Variant("bitsandbytes Linear8bitLt (LLM.int8, threshold 6.0), CPU backend", _bnb("bnb-int8")),
    "bnb nf4": Variant("bitsandbytes Linear4bit NF4 (fp32 compute), CPU backend", _bnb("bnb-nf4")),
}


def _units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level modules, with ``ModuleList``s split into their blocks (the unit of materialisation)."""
    units = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            units += [(f"{name}.{i}", block) for i, block in enumerate(child)]
        else:
            units.append((name, child))
    return units


@torch.no_grad()
def _materialise(prefix: str, unit: nn.Module) -> None:
    """fp32 random weights seeded by the unit's name (the same in every variant); buffers zeroed."""
    unit.to_empty(device="cpu")
    torch.manual_seed(zlib.crc32(prefix.encode()))
    for module in unit.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        elif list(module.parameters(recurse=False)):
            for param in module.parameters(recurse=False):
                param.normal_(0, 0.02)
        for buffer in module.buffers(recurse=False):
            buffer.zero_()


def layer_plan(model: nn.Module, adapter, recipe: str) -> dict:
    """Layer name -> spec (``None`` = kept float) of ``recipe``'s quantize stage rules."""
    from compressdit.quant.transform import resolve_plan
    from compressdit.recipe import load_recipe

    stage = next(s for s in load_recipe(recipe).stages if s.name == "quantize")
    return resolve_plan(model, adapter, stage.config.options.rules)


@torch.no_grad()
def build(model_name: str, variant_name: str, layers: int | None = None) -> tuple[nn.Module, object, dict]:
    """(model, adapter, info) for one variant (``layers`` shrinks the depth for smoke runs); info has the build
    seconds and the converted layer count."""
    import diffusers

    import compressdit  # noqa: F401  (quiets torchao's import-time notes)
    from compressdit.models import adapter_for
    from compressdit.quant.kernel_registry import prepack_model

    class_name, config = MODELS[model_name]
    config = dict(config, **({"num_layers": layers} if layers else {}))
    variant = VARIANTS[variant_name]
    started = time.perf_counter()
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config).eval()
    adapter = adapter_for(model)
    plan = layer_plan(model, adapter, variant.plan_recipe) if variant.plan_recipe else {}
    targets = {name: spec for name, spec in plan.items() if spec is not None}
    units = _units(model)
    owned = {prefix: [n[len(prefix) + 1:] for n in targets if n.startswith(prefix + ".")] for prefix, _ in units}
    for prefix, unit in units:
        _materialise(prefix, unit)
        names = owned[prefix]
        if getattr(variant.convert, "needs_specs", False):
            converted = variant.convert(unit, names, {n: targets[f"{prefix}.{n}"] for n in names})
        else:
            converted = variant.convert(unit, names)
        if converted is not unit:
            from compressdit.quant.transform import set_module

            set_module(model, prefix, converted)
    _materialise_root(model)
    if variant.dtype != torch.float32:
        model.to(variant.dtype)
    prepack_model(model)
    return model, adapter, {"build_s": round(time.perf_counter() - started, 2), "layers_converted": len(targets)}


@torch.no_grad()
def _materialise_root(model: nn.Module) -> None:
    """The parameters and buffers a model holds itself, in no child (PixArt's ``scale_shift_table``)."""
    torch.manual_seed(0)
    for name, param in list(model.named_parameters(recurse=False)):
        if param.is_meta:
            setattr(model, name, nn.Parameter(torch.randn(param.shape) * 0.02, requires_grad=False))
    for name, buffer in list(model.named_buffers(recurse=False)):
        if buffer.is_meta:
            model.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype))


def step_inputs(adapter, model: nn.Module, batch: int, dtype: torch.dtype) -> tuple:
    """(latents, timestep, conditioning) of one CFG-batched step: ``2 * batch`` rows (cond + uncond); text
    models get random 120-token embeddings of the config's caption width (no text encoder)."""
    from compressdit.models.sampling import initial_latents
    from compressdit.models.text_conditions import synthetic_text

    if adapter.condition_kind == "class":
        cond = adapter.encode(model, [i % 1000 for i in range(batch)])
        uncond = adapter.encode(model, adapter.null_conditions(batch))
    else:
        width = model.config.caption_channels
        cond = adapter.encode(model, synthetic_text(batch, TEXT_TOKENS, width, seed=0))
        uncond = adapter.encode(model, synthetic_text(batch, TEXT_TOKENS, width, seed=1))
    x = initial_latents(adapter, model, batch, 0)
    both = cond.cat(uncond).to("cpu", dtype)
    return torch.cat([x, x]).to(dtype), torch.tensor([500]), both


@torch.no_grad()
def one_step(adapter, model: nn.Module, inputs: tuple) -> torch.Tensor:
    x, t, cond = inputs
    return adapter.predict(model, x, t, cond)
