"""The width manifest: per-layer shapes and per-attention head counts that a diffusers config cannot express.

A diffusers config sizes every layer of a kind alike (``num_attention_heads``, ``mlp_ratio``), so a model whose
blocks were width-pruned differently cannot be rebuilt from ``config.json`` alone. The difference from what the
config builds is kept in ``quantization_config.structure`` (see :mod:`compressdit.io.diffusers_quantizer`)::

    {"width": {"transformer_blocks.0.ff.net.0.proj": [192, 64], "transformer_blocks.0.ff.net.2": [64, 192]},
     "heads": {"transformer_blocks.0.attn1": 1}}

``width`` maps a linear's fully qualified name to its ``[out_features, in_features]``; ``heads`` maps an
attention module to its head count; ``moe`` maps a dense FFN's name to the :class:`~compressdit.moe.layers.MoELayout`
of the mixture of experts that replaced it (Dense2MoE), e.g. ``{"transformer_blocks.0.ff": {"dim": 128,
"dim_out": 128, "experts": 7, "expert_hidden": 64, "top_k": 3, "shared_hidden": 64, ...}}``; ``mob`` maps a block
stack's attribute to the :class:`~compressdit.moe.blocks.MoBLayout` of its Mixture of Blocks, e.g.
``{"transformer_blocks": {"blocks": 12, "group": 4, "active": 2, "features": 256}}``. A parallel MLP split by
Dense2MoE (FLUX single-stream blocks) adds ``tail_sum``, the fused output projections that became a
:class:`~compressdit.moe.layers.TailSum` with their head width (``{"single_transformer_blocks.0.proj_out": 128}``),
and ``identity``, the modules that became ``nn.Identity`` (``["single_transformer_blocks.0.act_mlp"]``).
:func:`~compressdit.io.save.record_structure` writes the manifest of a pruned model (stock
``save_pretrained`` then saves it), :func:`apply_structure` reshapes the empty model built by
``from_pretrained`` before its weights load. Other ``structure`` keys belong to other transforms and are left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compressdit.errors import CheckpointError, ConfigError
from compressdit.models import adapter_for
from compressdit.moe.blocks import MoBLayout, route_blocks, routed_stacks
from compressdit.moe.layers import MoEFeedForward, MoELayout, TailSum

WIDTH, HEADS, MOE, MOB, TAIL_SUM, IDENTITY = "width", "heads", "moe", "mob", "tail_sum", "identity"


def is_attention(module: nn.Module) -> bool:
    """A diffusers attention module (``Attention``, ``FluxAttention``, ...): query projection + head count."""
    return isinstance(getattr(module, "heads", None), int) and isinstance(getattr(module, "to_q", None), nn.Linear)


def head_dim(attn: nn.Module) -> int:
    """Channels per head (``inner_dim // heads``); diffusers' ``Attention`` keeps no attribute for it."""
    return attn.to_q.out_features // attn.heads


def set_heads(attn: nn.Module, heads: int, dim_head: int) -> None:
    """Head count and the attributes derived from it, as the attention's ``__init__`` would have set them.

    Processors split projections with ``attn.heads`` (``Attention``) or ``attn.head_dim`` (``FluxAttention``);
    ``inner_dim`` / ``inner_kv_dim`` / ``sliceable_head_dim`` are bookkeeping that sliced attention and fused
    projections read.
    """
    attn.heads = heads
    for name, value in (("inner_dim", heads * dim_head), ("inner_kv_dim", heads * dim_head),
                        ("sliceable_head_dim", heads)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def reference_model(model: nn.Module) -> nn.Module:
    """The model ``model.config`` builds, with empty (``meta``) parameters: what a stock reload starts from."""
    from accelerate import init_empty_weights

    config = {k: v for k, v in model.config.items() if k != "quantization_config"}
    with init_empty_weights():
        return type(model).from_config(config)


def _shape(linear: nn.Linear) -> list[int]:
    return [int(linear.out_features), int(linear.in_features)]


def structure_of(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every linear whose shape and every attention whose head count differ from what the config builds, and
    every MoE layer's layout."""
    reference = dict(reference_model(model).named_modules())
    width, heads = {}, {}
    moe = {name: m.layout.to_dict() for name, m in model.named_modules() if isinstance(m, MoEFeedForward)}
    for name, module in model.named_modules():
        built = reference.get(name)
        if isinstance(module, nn.Linear) and isinstance(built, nn.Linear) and _shape(module) != _shape(built):
            width[name] = _shape(module)
        if is_attention(module) and built is not None and is_attention(built) and module.heads != built.heads:
            heads[name] = int(module.heads)
    mob = {name: blocks[0].layout.to_dict() for name, blocks in routed_stacks(model).items()}
    tails = {name: int(m.head_features) for name, m in model.named_modules() if isinstance(m, TailSum)}
    identity = [name for name, m in model.named_modules()
                if type(m) is nn.Identity and name in reference and type(reference[name]) is not nn.Identity]
    optional = {MOE: moe, MOB: mob, TAIL_SUM: tails, IDENTITY: identity}
    return {WIDTH: width, HEADS: heads, **{key: value for key, value in optional.items() if value}}


def _entries(structure: dict, key: str) -> dict:
    entries = structure.get(key, {})
    if not isinstance(entries, dict):
        raise CheckpointError(f"quantization_config.structure.{key} must map module names to values, "
                              f"got {type(entries).__name__}")
    return entries


def _module(model: nn.Module, name: str, key: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"quantization_config.structure.{key} names {name!r}, which "
                              f"{type(model).__name__} does not have (config.json and manifest do not match)") from None


def _positive_ints(value: Any, count: int) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return len(values) == count and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)


def _resize(linear: nn.Linear, out_features: int, in_features: int) -> None:
    """Empty parameters of the new shape on the linear's device and dtype (``meta`` while loading)."""
    weight = linear.weight
    linear.weight = nn.Parameter(torch.empty(out_features, in_features, device=weight.device, dtype=weight.dtype),
                                 requires_grad=weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(torch.empty(out_features, device=linear.bias.device, dtype=linear.bias.dtype),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = out_features, in_features


def _build_moe(model: nn.Module, name: str, entry: Any) -> None:
    """Replace the dense FFN ``name`` by an empty MoE layer of the recorded layout, on the FFN's device/dtype."""
    dense = _module(model, name, MOE)
    try:
        layout = MoELayout.from_dict(entry, f"quantization_config.structure.moe[{name!r}]")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    param = next(dense.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.device(device):
        moe = MoEFeedForward(layout)
    model.set_submodule(name, moe.to(param.dtype) if param is not None else moe)


def _build_tail_sum(model: nn.Module, name: str, head_features: Any) -> None:
    """Replace the fused output linear ``name`` by an empty :class:`TailSum` keeping ``head_features`` columns."""
    linear = _module(model, name, TAIL_SUM)
    if type(linear) is not nn.Linear or not _positive_ints(head_features, 1) \
            or head_features >= linear.in_features:
        raise CheckpointError(f"quantization_config.structure.tail_sum[{name!r}] must be a head width below the "
                              f"input width of a Linear, got {head_features!r} for a {type(linear).__name__}")
    weight = linear.weight
    with torch.device(weight.device):
        tail = TailSum(head_features, linear.out_features)
    model.set_submodule(name, tail.to(weight.dtype))


def _build_mob(model: nn.Module, attribute: str, entry: Any) -> None:
    """Wrap the blocks of ``model.<attribute>`` in routed blocks of the recorded layout (empty routers)."""
    where = f"quantization_config.structure.mob[{attribute!r}]"
    try:
        layout = MoBLayout.from_dict(entry, where)
        stack = adapter_for(model).block_stack(attribute)
        route_blocks(model, stack, layout)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def apply_structure(model: nn.Module, structure: dict) -> nn.Module:
    """Reshape the layers and head counts and build the MoE layers a manifest records (before weights load);
    other keys are ignored."""
    if not isinstance(structure, dict):
        raise CheckpointError(f"quantization_config.structure must be a mapping, got {type(structure).__name__}")
    for name, entry in _entries(structure, MOE).items():
        _build_moe(model, name, entry)
    for attribute, entry in _entries(structure, MOB).items():
        _build_mob(model, attribute, entry)
    for name, head_features in _entries(structure, TAIL_SUM).items():
        _build_tail_sum(model, name, head_features)
    identity = structure.get(IDENTITY, [])
    if not isinstance(identity, list) or not all(isinstance(name, str) for name in identity):
        raise CheckpointError(f"quantization_config.structure.identity must list module names, got {identity!r}")
    for name in identity:
        _module(model, name, IDENTITY)
        model.set_submodule(name, nn.Identity())
    head_counts = {}
    for name, heads in _entries(structure, HEADS).items():
        attn = _module(model, name, HEADS)
        if not is_attention(attn) or not _positive_ints(heads, 1):
            raise CheckpointError(f"quantization_config.structure.heads[{name!r}] must be a positive head count of "
                                  f"an attention module, got {heads!r} for a {type(attn).__name__}")
        head_counts[name] = (attn, heads, head_dim(attn))  # channels per head, from the config-built layers
    for name, shape in _entries(structure, WIDTH).items():
        linear = _module(model, name, WIDTH)
        if type(linear) is not nn.Linear:
            raise CheckpointError(f"quantization_config.structure.width names {name!r}, a {type(linear).__name__}, "
                                  "not a Linear")
        if not _positive_ints(shape, 2):
            raise CheckpointError(f"quantization_config.structure.width[{name!r}] must be [out_features, "
                                  f"in_features], got {shape!r}")
        _resize(linear, *shape)
    for name, (attn, heads, dim_head) in head_counts.items():
        if attn.to_q.out_features != heads * dim_head:
            raise CheckpointError(f"quantization_config.structure: {name} has {heads} heads of {dim_head} channels "
                                  f"but {name}.to_q has {attn.to_q.out_features} outputs (inconsistent manifest)")
        set_heads(attn, heads, dim_head)
    return model
