"""Any diffusers transformer without a family adapter: layer roles from diffusers' common module names.

Used by :func:`compressdit.models.base.adapter_for` when no registered adapter matches and the model is a
diffusers ``ModelMixin`` with ``nn.Linear`` layers (Lumina2, AuraFlow, Chroma, CogView4, Mochi, Sana, ...).

Roles, first match wins: modules the class keeps in fp32 (``_keep_in_fp32_modules``) and anything under a
module whose name holds ``embed`` (``x_embedder``, ``time_text_embed``, ``patch_embed``, ``context_embedder``),
a top-level ``time*`` module or a ``caption_proj*`` -> ``embedder``; top-level ``proj_out`` / ``norm_out`` /
``final_layer`` -> ``head``; any other Linear outside the block lists (the top-level ``nn.ModuleList``s of
Linears) -> ``head`` where a module on its path is named ``*final*`` (Z-Image's ``all_final_layer.2-1.linear``) or
its top-level module comes after the last block list, else ``embedder`` (QwenImage's ``img_in`` / ``txt_in``,
LTX-Video's ``proj_in``, Chroma's ``distilled_guidance_layer``: the input projections and conditioning MLPs the
family adapters keep float too); the text stream of joint blocks (``add_*_proj``, ``to_add_out``, ``ff_context``,
any module named ``*context*`` or ``txt_*``: QwenImage's) -> ``context``; the projections of a cross-attention
module (diffusers' ``Attention.is_cross_attention``) -> ``cross_q`` / ``cross_kv`` / ``cross_out``; ``to_q/k/v``
-> ``attn_qkv``; ``to_out.0`` -> ``attn_out``; ``ff.net.0.proj`` / ``*mlp.net.0.proj``, ``proj_mlp``, ``fc1``,
``w1``/``w3`` and a feed-forward's ``linear_1`` -> ``ffn_up``; ``ff.net.2`` / ``*mlp.net.2``, ``fc2``, ``w2``,
``out_projection`` and a block's ``proj_out`` -> ``ffn_down``; ``norm*.linear`` and ``*_mod.<i>`` (QwenImage's
``img_mod.1``) -> ``adaln``. Other Linears (a feed-forward's ``linear_2``, which is the down projection in Lumina2
but an up projection in AuraFlow) get no role: ``re:.*`` rules quantize them.

The adapter cannot sample: the calling convention of each family's forward (latent layout, timestep scale,
position ids, extra conditions) lives in its pipeline. Recipes with a calibrate or evaluate stage fail with
one line naming the recipes that run (RTN and weight-only ones, ``--no-eval``); the stock-reload check of a
saved checkpoint compares the reloaded state dict with the in-memory one, tensor by tensor.
"""

from __future__ import annotations

import re

from torch import nn

from compressdit.errors import UnsupportedModelError
from compressdit.models.base import ModelAdapter

_ANY = r"(?:.*\.)?"
_FF = r"(?:ff|ffn|feed_forward|mlp)"
#: the shipped recipes that need no data (``compressdit.recipe.data_free_recipes``: a test keeps them equal; the recipe
#: module sits above this one)
CALIBRATION_FREE = ("rtn-w8a8, rtn-w8a16, rtn-w4a8, rtn-w4a8-channel, rtn-w4a16, rtn-w4a4, rtn-w3a16, rtn-w2a16, "
                    "fp8, nvfp4, mxfp4")

GENERIC_ROLES: dict[str, tuple[str, ...]] = {
    "embedder": (_ANY + r"[^.]*embed[^.]*(?:\..*)?", r"time[^.]*(?:\..*)?", _ANY + r"caption_proj[^.]*(?:\..*)?"),
    "head": (r"proj_out(?:\..*)?", r"norm_out(?:\..*)?", r"final_layer(?:\..*)?"),
    "context": (_ANY + r"add_[qkv]_proj", _ANY + r"to_add_out", _ANY + r"ff_context\..*",
                _ANY + r"[^.]*context[^.]*(?:\..*)?", _ANY + r"txt_[^.]*(?:\..*)?"),
    "attn_qkv": (_ANY + r"to_(?:[qkv]|qkv|kv)",),
    "attn_out": (_ANY + r"to_out(?:\.0)?",),
    "ffn_up": (_ANY + r"ff\.net\.0\.proj", _ANY + r"[^.]*mlp\.net\.0\.proj", _ANY + r"proj_mlp",
               _ANY + _FF + r"\.(?:fc1|w1|w3|linear_1|linear_3)"),
    "ffn_down": (_ANY + r"ff\.net\.2", _ANY + r"[^.]*mlp\.net\.2", _ANY + _FF + r"\.(?:fc2|w2|out_projection)",
                 r".+\.proj_out"),
    "adaln": (_ANY + r"norm[^.]*\.linear(?:_\d)?", _ANY + r"[^.]*_mod\.\d+"),
}
_CROSS = {"to_q": "cross_q", "to_k": "cross_kv", "to_v": "cross_kv", "to_out.0": "cross_out"}


def is_diffusers_transformer(cls: type) -> bool:
    """A diffusers ``ModelMixin`` class defined in ``diffusers.models.transformers`` (or a subclass of one)."""
    from diffusers import ModelMixin

    return (isinstance(cls, type) and issubclass(cls, ModelMixin)
            and any(c.__module__.startswith("diffusers.models.transformers") for c in cls.__mro__))


class GenericAdapter(ModelAdapter):
    """Roles and blocks of one diffusers model class by module names; no sampling loop (see module doc)."""

    family = "generic"
    condition_kind = "text"  # a known kind, so stages that sample reach the one-line error below, not a KeyError
    block_patterns = ()
    block_stacks = ()
    roles = GENERIC_ROLES

    def __init__(self, model: nn.Module) -> None:
        if not is_diffusers_transformer(type(model)):
            raise UnsupportedModelError(f"{type(model).__name__} is not a diffusers transformer "
                                        "(a ModelMixin from diffusers.models.transformers)")
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear layers: nothing to quantize")
        self.model_class_name = type(model).__name__
        self.keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
        self.block_lists = tuple(name for name, child in model.named_children()
                                 if isinstance(child, nn.ModuleList) and len(child)
                                 and any(isinstance(m, nn.Linear) for m in child.modules()))
        children = [name for name, _ in model.named_children()]
        last = max((children.index(name) for name in self.block_lists), default=len(children))
        self.after_blocks = frozenset(children[last + 1:])  # top-level modules defined after the last block list
        self.fixed_roles = {f"{name}.{suffix}": role for name, m in model.named_modules()
                            if getattr(m, "is_cross_attention", False) for suffix, role in _CROSS.items()}

    def role_of(self, name: str) -> str | None:
        if any(k in name.split(".") for k in self.keep_fp32):
            return "embedder"  # the class keeps it in fp32: never quantized (diffusers would refuse the reload)
        for role, patterns in self.roles.items():
            if role in ("embedder", "head") and any(re.fullmatch(p, name) for p in patterns):
                return role
        parts = name.split(".")
        if self.block_lists and parts[0] not in self.block_lists:  # outside the blocks: an input or output layer
            final = parts[0] in self.after_blocks or any("final" in part for part in parts)
            return "head" if final else "embedder"
        if name in self.fixed_roles:
            return self.fixed_roles[name]
        return super().role_of(name)

    def blocks(self, model):
        """Children of the model's top-level ``nn.ModuleList``s that hold Linears, in definition order."""
        return [(f"{attr}.{i}", block) for attr in self.block_lists for i, block in enumerate(getattr(model, attr))]

    def synthetic_conditioning(self, model, batch, seed=0):
        return None  # the forward's calling convention is the pipeline's; reload checks compare tensors

    def cannot_sample(self) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"compressdit has no sampling loop for {self.model_class_name} (no family adapter): calibrated recipes "
            f"need the pipeline folder (model_index.json), which compressdit samples through; from a bare "
            f"transformer folder use a calibration-free recipe with --no-eval ({CALIBRATION_FREE})")

    def latent_shape(self, model):
        raise self.cannot_sample()

    def encode(self, model, conditions):
        raise self.cannot_sample()

    def null_conditions(self, count):
        raise self.cannot_sample()

    def predict(self, model, latents, timestep, cond):
        raise self.cannot_sample()

    def scheduler(self, model):
        """None: there is nothing to sample with (stages that sample stop at ``latent_shape`` / ``encode``)."""
        return None
