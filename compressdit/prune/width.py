"""Width pruning: remove FFN hidden channels and whole attention heads inside transformer blocks.

Torch-Pruning's three concerns (Fang et al., DepGraph, CVPR 2023, arXiv 2301.12900), one unit at a time (one
MLP's hidden channels, or one attention's heads): a coupling *group* of layers, an *importance* that scores the
group's channels (``tp.importance`` magnitude, or first-order Taylor ``|w * dL/dw|`` from calibration gradients),
and torch-pruning's per-layer prune functions to cut. Each unit loses ``ratio`` of its channels (heads). The
pruned shapes are recorded in the model's ``quantization_config.structure`` (:mod:`compressdit.io.structure`), so stock
``save_pretrained`` / ``from_pretrained`` round-trip the pruned model. YAML::

    prune_width: {ffn_ratio: 0.25, head_ratio: 0.25, importance: taylor, roles: [ffn_up, attn_qkv]}

Who builds the groups:

- FFNs (diffusers ``FeedForward``: GELU, GEGLU, SwiGLU, ...): a ``tp.DependencyGraph`` traced on the
  FeedForward module alone. Its group joins the down projection's input columns with the up projection's rows,
  both halves of a gated (GEGLU) projection included, whatever the activation.
- Attention heads: our code, from the module's attributes, because tracing cannot follow diffusers' attention
  (measured with torch-pruning 1.6 on diffusers 0.42): ``scaled_dot_product_attention`` is an op it does not know
  and treats as element-wise, coupling q/k/v/out channel by channel with no notion of whole heads or of
  ``attn.heads``; joint attention (SD3, Flux) concatenates text and image tokens along the *sequence* axis, which
  the tracer takes for a channel concat, so to_q's channels map onto the wrong channels of to_v / add_v_proj and
  to_out / to_add_out drop out of the group; and the per-head RMSNorm weights (``norm_q``/``norm_k``, over
  ``head_dim`` and shared by all heads) show up as "unwrapped parameters" that it would cut. We state the group
  (q/k/v rows, the text stream's add_q/k/v rows of joint attention, the input columns of to_out / to_add_out)
  as a ``tp.Group`` and score and cut it with torch-pruning like a traced one.
- Flux single-stream blocks: ``proj_mlp`` feeds ``proj_out`` through ``concat(attention, MLP)`` (attention
  first, as ``FluxSingleTransformerBlock`` does); the attention's heads own ``proj_out``'s first
  ``heads * head_dim`` input columns, the MLP the rest. These two groups are ours too (the block forward needs
  rotary embeddings and joint tokens to trace, and runs through the attention above).

Cross-attention (PixArt ``attn2``) loses heads only: its k/v inputs come from the text encoder and keep their width.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import CalibrationError, ConfigError, UnsupportedModelError
from compressdit.models.base import Conditioning, ModelAdapter
from compressdit.io.save import record_structure
from compressdit.io.structure import HEADS, WIDTH, head_dim, is_attention, set_heads
from compressdit.quant.layers import QuantizedLinear
from compressdit.registry import Registry

FFN_ROLES = ("ffn_up", "context")        # image-stream MLPs (and Flux's proj_mlp); MMDiT text-stream ff_context
HEAD_ROLES = ("attn_qkv", "cross_q")     # self / joint attention; cross-attention
PRUNABLE_ROLES = FFN_ROLES + HEAD_ROLES
_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_HEAD_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")

if TYPE_CHECKING:
    import torch_pruning as tp


def _tp():
    """torch-pruning, imported where width pruning runs (``import compressdit`` does not need it)."""
    import torch_pruning

    return torch_pruning


@dataclass(frozen=True)
class WidthImportance:
    """A torch-pruning importance (``group -> per-channel scores``) and whether it reads weight gradients."""

    make: Callable[[], tp.importance.Importance]
    needs_gradients: bool = False


WIDTH_IMPORTANCE: Registry[WidthImportance] = Registry("width importance")
WIDTH_IMPORTANCE.add("magnitude", WidthImportance(lambda: _tp().importance.GroupMagnitudeImportance(p=2, normalizer=None)))
WIDTH_IMPORTANCE.add("taylor", WidthImportance(lambda: _tp().importance.GroupTaylorImportance(normalizer=None), True))


@dataclass
class WidthConfig(StrictConfig):
    """Which units lose how much, scored how. YAML::

        prune_width:
          ffn_ratio: 0.25          # fraction of each MLP's hidden channels removed
          head_ratio: 0.25         # fraction of each attention's heads removed (at least one head stays)
          importance: magnitude    # or taylor (needs calibration batches or a loss)
          roles: [ffn_up, context, attn_qkv, cross_q]
          blocks: ["transformer_blocks\\\\.(1[0-9]|2[0-7])"]   # anchored regexes over block names; null = all
          ffn_multiple: 64         # kept MLP width is a multiple of this (GEMM-friendly)

    ``roles``: ``ffn_up`` image-stream MLPs (Flux single blocks' ``proj_mlp`` too), ``context`` the text-stream
    MLPs of MMDiT blocks, ``attn_qkv`` self/joint attention heads, ``cross_q`` cross-attention heads.
    """

    ffn_ratio: float = 0.0
    head_ratio: float = 0.0
    importance: str = "magnitude"
    roles: list[str] = field(default_factory=lambda: list(PRUNABLE_ROLES))
    blocks: list[str] | None = None
    ffn_multiple: int = 1

    def validate(self, where: str) -> None:
        for key in ("ffn_ratio", "head_ratio"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"{where}.{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.importance not in WIDTH_IMPORTANCE:
            raise ConfigError(f"{where}.importance: unknown {self.importance!r}; known: "
                              f"{', '.join(WIDTH_IMPORTANCE)}")
        unknown = sorted(set(self.roles) - set(PRUNABLE_ROLES))
        if unknown:
            raise ConfigError(f"{where}.roles: {unknown[0]!r} cannot be width-pruned; choose from "
                              f"{', '.join(PRUNABLE_ROLES)}")
        for pattern in self.blocks or []:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"{where}.blocks: invalid regex {pattern!r}: {exc}") from None
        if self.ffn_multiple < 1:
            raise ConfigError(f"{where}.ffn_multiple: must be >= 1, got {self.ffn_multiple}")


@dataclass
class CalibrationBatch:
    """One denoising call (noisy latents, timestep, conditions) and the prediction to match.

    ``target`` is a teacher's prediction (the unpruned model) or the diffusion target (noise / velocity).
    """

    latents: torch.Tensor
    timestep: torch.Tensor
    cond: Conditioning
    target: torch.Tensor


@dataclass(eq=False)
class WidthUnit:
    """Coupled channels: one MLP's hidden channels, or one attention's heads (``head_dim > 0``).

    ``group(idxs)`` gives the torch-pruning group removing unit-local channels ``idxs`` (``0..channels-1``)
    from every layer in ``layers`` (fully qualified name -> linear).
    """

    name: str
    role: str
    channels: int
    layers: dict[str, nn.Linear]
    group: Callable[[list[int]], tp.Group]
    attention: nn.Module | None = None
    head_dim: int = 0


def _group(items: list[tuple[nn.Linear, Callable, list[int]]], root_idxs: list[int]) -> tp.Group:
    """A torch-pruning group stated by hand: ``(layer, prune function, channel indices in that layer)``."""
    group = _tp().Group()
    for layer, prune_fn, idxs in items:
        node = _tp().Node(layer, grad_fn=None)
        group.add_dep(_tp().Dependency(prune_fn, prune_fn, source=node, target=node), list(idxs))
        group[len(group) - 1].root_idxs = list(root_idxs)  # what the importance accumulates scores on
    return group


def _traced_ffn(name: str, role: str, ff: nn.Module, names: list[str], up: nn.Linear, down: nn.Linear) -> WidthUnit:
    x = torch.randn(1, 1, up.in_features, device=up.weight.device, dtype=up.weight.dtype, requires_grad=True)
    with torch.enable_grad():
        graph = _tp().DependencyGraph().build_dependency(ff, example_inputs=x, forward_fn=lambda m, x: m(x),
                                                      verbose=False)

    def group(idxs: list[int]) -> tp.Group:
        return graph.get_pruning_group(down, _tp().prune_linear_in_channels, list(idxs))

    if not any(item.dep.target.module is up for item in group([0])):
        raise UnsupportedModelError(f"{name}: tracing the MLP did not couple its up and down projections")
    return WidthUnit(name, role, down.in_features, dict(zip(names, (up, down))), group)


def _concat_ffn(names: list[str], role: str, up: nn.Linear, down: nn.Linear) -> WidthUnit:
    offset = down.in_features - up.out_features  # the attention's columns come first (Flux single blocks)

    def group(idxs: list[int]) -> tp.Group:
        return _group([(up, _tp().prune_linear_out_channels, idxs),
                       (down, _tp().prune_linear_in_channels, [offset + i for i in idxs])], idxs)

    return WidthUnit(names[0], role, up.out_features, dict(zip(names, (up, down))), group)


def _loose_mlp(block_name: str, block: nn.Module, adapter: ModelAdapter, inside: set[int]):
    """The ``(names, up, down)`` of an MLP outside a ``FeedForward`` (Flux's ``proj_mlp`` -> ``proj_out``)."""
    by_role: dict[str, list[tuple[str, nn.Linear]]] = {"ffn_up": [], "ffn_down": []}
    for name, m in block.named_modules():
        fqn = f"{block_name}.{name}"
        if isinstance(m, nn.Linear) and id(m) not in inside and adapter.role_of(fqn) in by_role:
            by_role[adapter.role_of(fqn)].append((fqn, m))
    ups, downs = by_role["ffn_up"], by_role["ffn_down"]
    if not ups and not downs:
        return None
    if len(ups) != 1 or len(downs) != 1 or downs[0][1].in_features < ups[0][1].out_features:
        raise UnsupportedModelError(f"{block_name}: cannot pair its MLP layers {[n for n, _ in ups + downs]}")
    return [ups[0][0], downs[0][0]], ups[0][1], downs[0][1]


def _check_head_norms(name: str, attn: nn.Module, dim: int) -> None:
    for norm_name in _HEAD_NORMS:
        norm = getattr(attn, norm_name, None)
        if norm is None:
            continue
        sizes = {p.shape[-1] for p in norm.parameters()} | set(getattr(norm, "normalized_shape", ()) or ())
        if sizes - {dim}:
            raise UnsupportedModelError(f"{name}.{norm_name} normalises over all heads (size {max(sizes)}); width "
                                        f"pruning keeps per-head norms (size {dim}) only")


def _heads(name: str, role: str, attn: nn.Module, loose) -> WidthUnit:
    if getattr(attn, "fused_projections", False):
        raise UnsupportedModelError(f"{name} has fused q/k/v projections; call unfuse_qkv_projections() first")
    dim = head_dim(attn)
    inner = attn.heads * dim
    rows = {f"{name}.{n}": getattr(attn, n) for n in _QKV if isinstance(getattr(attn, n, None), nn.Linear)}
    odd = [n for n, linear in rows.items() if linear.out_features != inner]
    if odd:
        raise UnsupportedModelError(f"{name}: {odd[0]} has {rows[odd[0]].out_features} outputs, not heads x "
                                    f"head_dim = {inner} (grouped key/value heads are not supported)")
    _check_head_norms(name, attn, dim)
    columns = {}
    if getattr(attn, "to_out", None) is not None:
        columns[f"{name}.to_out.0"] = attn.to_out[0]
    if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
        columns[f"{name}.to_add_out"] = attn.to_add_out
    if not columns:  # no output projection: the block's MLP down projection reads concat(attention, MLP)
        if loose is None or loose[2].in_features != inner + loose[1].out_features:
            raise UnsupportedModelError(f"{name} has no output projection and no layer reading its output was found")
        columns[loose[0][1]] = loose[2]

    def group(idxs: list[int]) -> tp.Group:
        return _group([(m, _tp().prune_linear_out_channels, idxs) for m in rows.values()]
                      + [(m, _tp().prune_linear_in_channels, idxs) for m in columns.values()], idxs)

    return WidthUnit(name, role, inner, {**rows, **columns}, group, attention=attn, head_dim=dim)


def width_units(model: nn.Module, adapter: ModelAdapter, config: WidthConfig) -> list[WidthUnit]:
    """Every unit the config prunes (selected blocks, selected roles with a non-zero ratio), MLPs first."""
    from diffusers.models.attention import FeedForward

    ffn_roles = [r for r in config.roles if r in FFN_ROLES] if config.ffn_ratio else []
    head_roles = [r for r in config.roles if r in HEAD_ROLES] if config.head_ratio else []
    units = []
    for stack, index, block in adapter.block_list(model):
        block_name = f"{stack}.{index}"
        if config.blocks is not None and not any(re.fullmatch(p, block_name) for p in config.blocks):
            continue
        inside, heads = set(), []
        for name, module in block.named_modules():
            fqn = f"{block_name}.{name}"
            if isinstance(module, FeedForward):
                named = [(f"{fqn}.{n}", m) for n, m in module.named_modules() if isinstance(m, nn.Linear)]
                if len(named) != 2:
                    raise UnsupportedModelError(f"{fqn}: expected an up and a down projection, found "
                                                f"{[n for n, _ in named]}")
                inside.update(id(m) for _, m in named)
                role = adapter.role_of(named[0][0])
                if role in ffn_roles:
                    units.append(_traced_ffn(named[0][0], role, module, [n for n, _ in named], named[0][1],
                                             named[1][1]))
            elif is_attention(module):
                heads.append((fqn, module, adapter.role_of(f"{fqn}.to_q")))
        loose = _loose_mlp(block_name, block, adapter, inside)
        if loose is not None and "ffn_up" in ffn_roles:
            units.append(_concat_ffn(loose[0], "ffn_up", loose[1], loose[2]))
        units += [_heads(fqn, role, attn, loose) for fqn, attn, role in heads if role in head_roles]
    return units


def _removed(unit: WidthUnit, scores: torch.Tensor, config: WidthConfig) -> list[int]:
    """Unit-local channels to remove: the lowest-scoring whole heads, or MLP channels (ties: lower index first)."""
    if unit.head_dim:
        count = unit.channels // unit.head_dim
        drop = min(math.floor(config.head_ratio * count + 0.5), count - 1)
        per_head = scores.reshape(count, unit.head_dim).sum(1)
        heads = sorted(torch.argsort(per_head, stable=True)[:drop].tolist())
        return [h * unit.head_dim + c for h in heads for c in range(unit.head_dim)]
    multiple = config.ffn_multiple
    keep = unit.channels - math.floor(config.ffn_ratio * unit.channels + 0.5)
    keep = min(unit.channels, max(multiple, multiple * round(keep / multiple)))
    return sorted(torch.argsort(scores, stable=True)[:unit.channels - keep].tolist())


@contextmanager
def _gradients_of(model: nn.Module, layers: list[nn.Linear]) -> Iterator[None]:
    """Only the pruned layers' weights take gradients, for the duration; then flags are restored, grads cleared."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.requires_grad_(False)
        for layer in layers:
            layer.weight.requires_grad_(True)
            layer.weight.grad = None
        yield
    finally:
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)


def _accumulate_gradients(model: nn.Module, adapter: ModelAdapter, layers: list[nn.Linear],
                          batches: Iterable[CalibrationBatch] | None, loss_fn) -> None:
    with torch.enable_grad():
        if loss_fn is not None:
            loss_fn(model).backward()
        else:
            for batch in batches:
                pred = adapter.predict(model, batch.latents, batch.timestep, batch.cond)
                F.mse_loss(pred.float(), batch.target.float()).backward()
    if all(layer.weight.grad is None for layer in layers):
        raise CalibrationError("the calibration loss does not depend on any layer being pruned (no gradients)")
    for layer in layers:  # a layer the loss does not reach scores zero
        if layer.weight.grad is None:
            layer.weight.grad = torch.zeros_like(layer.weight)


def prune_width(model: nn.Module, adapter: ModelAdapter, config: WidthConfig,
                calibration_batches: Iterable[CalibrationBatch] | None = None,
                loss_fn: Callable[[nn.Module], torch.Tensor] | None = None) -> dict[str, dict]:
    """Remove the least important MLP channels and attention heads of every selected unit (in place).

    Gradient-based importances (``taylor``) take either ``loss_fn(model) -> scalar`` (called once, the caller
    decides data and loss) or ``calibration_batches`` (MSE of ``adapter.predict`` against each batch's target).
    When anything changed, the model's width manifest is recorded (:func:`~compressdit.io.save.record_structure`:
    the model then counts as quantized to diffusers, which refuses dtype casts of it). Returns the new shapes
    of the changed modules: ``{"width": {linear: [out, in]}, "heads": {attention: heads}}``.
    """
    config.validate("prune_width")
    criterion = WIDTH_IMPORTANCE.get(config.importance)
    units = width_units(model, adapter, config)
    layers = {n: m for u in units for n, m in u.layers.items()}
    quantized = [n for n, m in layers.items() if isinstance(m, QuantizedLinear)]
    if quantized:
        raise ConfigError(f"{quantized[0]} is already quantized; prune width first, then quantize")
    if criterion.needs_gradients and (calibration_batches is None) == (loss_fn is None):
        raise ConfigError(f"importance {config.importance!r} needs gradients: pass calibration_batches or loss_fn "
                          "(exactly one)")
    scorer = criterion.make()
    plan = {}
    with _gradients_of(model, list(layers.values())) if criterion.needs_gradients else nullcontext():
        if criterion.needs_gradients:
            _accumulate_gradients(model, adapter, list(layers.values()), calibration_batches, loss_fn)
        for unit in units:
            scores = scorer(unit.group(list(range(unit.channels))))
            if scores is None or not torch.isfinite(scores).all():
                raise CalibrationError(f"{unit.name}: {config.importance} importance is not finite")
            plan[unit] = _removed(unit, scores.float().cpu(), config)
    flags = {(m, n): p.requires_grad for m in layers.values() for n, p in m.named_parameters(recurse=False)}
    changed = {WIDTH: {}, HEADS: {}}
    with torch.no_grad():
        for unit, idxs in plan.items():
            if not idxs:
                continue
            unit.group(idxs).prune(record_history=False)
            if unit.attention is not None:
                set_heads(unit.attention, (unit.channels - len(idxs)) // unit.head_dim, unit.head_dim)
                changed[HEADS][unit.name] = unit.attention.heads
            changed[WIDTH].update({n: [m.out_features, m.in_features] for n, m in unit.layers.items()})
    for (m, n), flag in flags.items():  # torch-pruning makes new parameters; keep frozen layers frozen
        getattr(m, n).requires_grad_(flag)
    if changed[WIDTH]:
        record_structure(model)
    return changed
