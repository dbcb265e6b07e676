"""The adapter contract: layer roles by name pattern, conditioning, one denoising call."""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from compressdit.errors import ConfigError, UnsupportedModelError
from compressdit.models.text_conditions import synthetic_text
from compressdit.registry import Registry

# Roles every adapter may name; recipes select layers with ``role:NAME`` patterns.
# ``temporal``: attention that mixes tokens across frames only (families with separate temporal attention).
ROLES = ("attn_qkv", "attn_out", "cross_q", "cross_kv", "cross_out", "ffn_up", "ffn_down", "adaln",
         "context", "embedder", "head", "temporal")


@dataclass(frozen=True)
class BlockStack:
    """One ``nn.ModuleList`` of transformer blocks on the model and the config key that sizes it.

    ``returns`` names the block ``forward`` arguments it returns updated, in return order (one name: a bare
    tensor), so an identity block returns those arguments unchanged. ``keep_last``: the last block is of
    another kind (SD3's ``context_pre_only``) and must stay. ``index_keys``: config keys that list indices
    into this stack (SD3.5's ``dual_attention_layers``); they are renumbered when blocks are removed.
    ``first_block_reads``: dotted paths of submodules of the first block that the model calls outside the block
    loop (DiT's head: ``norm1.emb``); after depth pruning they are those of the first kept block.
    """

    attribute: str
    config_key: str
    keep_last: bool = False
    returns: tuple[str, ...] = ("hidden_states",)
    index_keys: tuple[str, ...] = ()
    first_block_reads: tuple[str, ...] = ()

    def pack(self, values: dict[str, Any]) -> Any:
        """Block output built from named values (the inverse of :meth:`unpack`)."""
        out = tuple(values[name] for name in self.returns)
        return out[0] if len(out) == 1 else out

    def unpack(self, output: Any) -> dict[str, Any]:
        """A block's output by name."""
        if len(self.returns) == 1:
            return {self.returns[0]: output}
        return dict(zip(self.returns, output, strict=True))


@dataclass(frozen=True)
class OriginalTensor:
    """One tensor of a family's original checkpoint layout (BFL's FLUX, SAI's MMDiT): the diffusers tensors it is
    built from, concatenated along dim 0 (fused qkv), with its two halves swapped where ``swap_halves`` (the
    original final adaLN orders shift, scale; diffusers scale, shift). The inverse of diffusers' single-file
    converter for the family."""

    sources: tuple[str, ...]
    swap_halves: bool = False


@dataclass
class Conditioning:
    """Model inputs besides latents and timestep, for a batch; ``cat`` joins cond + uncond for CFG."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def cat(self, other: "Conditioning") -> "Conditioning":
        return Conditioning({k: torch.cat([v, other.tensors[k]]) for k, v in self.tensors.items()})

    def to(self, device: torch.device, dtype: torch.dtype) -> "Conditioning":
        return Conditioning({k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                             for k, v in self.tensors.items()})

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))


@dataclass(frozen=True)
class DenseFFN:
    """A dense MLP ``down(activation(up(x)))`` (Dense2MoE splits its hidden neurons); ``activation`` is a
    :data:`compressdit.moe.layers.ACTIVATIONS` name.

    A parallel MLP (:class:`ParallelMLP`: FLUX's single-stream blocks) has no module of its own: its down projection
    is the tail of a fused output linear whose input is ``cat([other branch, hidden])``, the hidden starting at
    input feature ``down_offset``; ``activation_module`` and ``down_module`` name (fully qualified) the block's
    activation module and that fused linear, which Dense2MoE replaces too. ``down_offset == 0``: a plain FFN."""

    up: nn.Linear
    down: nn.Linear
    activation: str
    down_offset: int = 0
    activation_module: str | None = None
    down_module: str | None = None

    def down_weight(self) -> torch.Tensor:
        """The down projection's columns that read the hidden neurons ``[out, hidden]``."""
        return self.down.weight[:, self.down_offset:]


@dataclass(frozen=True)
class ParallelMLP:
    """Where a block computes its MLP beside another branch and projects both at once (FLUX single-stream
    blocks: ``proj_out(cat([attn(x), act_mlp(proj_mlp(x))]))``): the block's anchored regex and the attribute names
    of the up projection, the activation module (a diffusers/torch GELU) and the fused output linear."""

    block: str
    up: str
    activation: str
    out: str


# diffusers' GELU activation module (``FeedForward.net[0]``) by its ``approximate`` attribute
_GELU_NAMES = {"none": "gelu", "tanh": "gelu-tanh"}


def _parallel_ffn(name: str, block: nn.Module, mlp: ParallelMLP) -> DenseFFN:
    up, act, out = (getattr(block, attr, None) for attr in (mlp.up, mlp.activation, mlp.out))
    approximate = getattr(act, "approximate", None)
    if type(up) is not nn.Linear or type(out) is not nn.Linear or approximate not in _GELU_NAMES \
            or out.in_features <= up.out_features:
        raise UnsupportedModelError(
            f"{name} is not a parallel GELU MLP ({mlp.up}: {type(up).__name__}, {mlp.activation}: "
            f"{type(act).__name__}, {mlp.out}: {type(out).__name__}); only plain float blocks can become MoE layers")
    return DenseFFN(up, out, _GELU_NAMES[approximate], down_offset=out.in_features - up.out_features,
                    activation_module=f"{name}.{mlp.activation}", down_module=f"{name}.{mlp.out}")


class ModelAdapter(ABC):
    """Facts about one diffusers transformer family. Subclasses fill the class attributes.

    ``roles`` maps a role to anchored regexes over module names (``re.fullmatch``).
    ``condition_kind`` is ``"class"`` (integer labels) or ``"text"`` (prompts).
    ``block_stacks`` lists the block ``ModuleList``s in execution order.
    ``text_width_key`` / ``pooled_width_key``: config keys holding the token and pooled text widths, from
    which :meth:`synthetic_conditioning` builds inputs without a text encoder. ``frame_axis``: the frame
    axis of a video family's latents ``[B, ...]`` (``None`` for images).
    """

    family: ClassVar[str]
    model_class_name: ClassVar[str]
    condition_kind: ClassVar[str]
    block_patterns: ClassVar[tuple[str, ...]]
    block_stacks: ClassVar[tuple[BlockStack, ...]]
    roles: ClassVar[dict[str, tuple[str, ...]]]
    keep_full_precision: ClassVar[tuple[str, ...]] = ("embedder", "head")
    prediction: ClassVar[str] = "epsilon"
    text_width_key: ClassVar[str | None] = None
    pooled_width_key: ClassVar[str | None] = None
    synthetic_tokens: ClassVar[int] = 4
    text_length_key: ClassVar[str | None] = None  # config key of a fixed text token count (CogVideoX)
    frame_axis: ClassVar[int | None] = None
    original_arch: ClassVar[str | None] = None  # GGUF ``general.architecture`` of the original layout (ComfyUI-GGUF)
    ffn_modules: ClassVar[tuple[str, ...]] = ()  # anchored regexes of the diffusers ``FeedForward``s (Dense2MoE)
    parallel_mlps: ClassVar[tuple[ParallelMLP, ...]] = ()  # MLPs fused into a block's output projection (Dense2MoE)
    drives_pipeline: ClassVar[bool] = False  # samples through a pipeline's own __call__ (models/driven.py)

    def role_of(self, name: str) -> str | None:
        for role, patterns in self.roles.items():
            if any(re.fullmatch(p, name) for p in patterns):
                return role
        return None

    def linear_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """Every ``nn.Linear`` of the model by fully qualified name."""
        return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    def feed_forwards(self, model: nn.Module) -> dict[str, DenseFFN]:
        """The dense FFNs matching ``ffn_modules`` by name: diffusers ``FeedForward``s whose ``net`` is a GELU
        projection (``net[0].proj``), dropout, and the down projection (its last ``nn.Linear``); then the
        ``parallel_mlps``, each by its up projection's name."""
        found = {}
        for name, module in model.named_modules():
            if not any(re.fullmatch(p, name) for p in self.ffn_modules):
                continue
            net = getattr(module, "net", None)
            act = net[0] if isinstance(net, nn.ModuleList) and len(net) else None
            linears = [m for m in net or [] if isinstance(m, nn.Linear)]
            if getattr(act, "approximate", None) not in _GELU_NAMES or not isinstance(act.proj, nn.Linear) \
                    or not linears:
                raise UnsupportedModelError(f"{name} ({type(module).__name__}) is not a GELU FeedForward "
                                            f"(net[0] is {type(act).__name__}); only GELU MLPs can become MoE layers")
            found[name] = DenseFFN(act.proj, linears[-1], _GELU_NAMES[act.approximate])
        for mlp in self.parallel_mlps:
            for name, block in model.named_modules():
                if re.fullmatch(mlp.block, name):
                    found[f"{name}.{mlp.up}"] = _parallel_ffn(name, block, mlp)
        return found

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Transformer blocks in execution order."""
        return [(name, m) for name, m in model.named_modules()
                if any(re.fullmatch(p, name) for p in self.block_patterns)]

    def block_list(self, model: nn.Module) -> list[tuple[str, int, nn.Module]]:
        """``(stack attribute, index, block)`` in execution order, as :meth:`blocks` lists ``attribute.index``."""
        return [(stack.attribute, i, block) for stack in self.block_stacks
                for i, block in enumerate(getattr(model, stack.attribute))]

    def block_stack(self, attribute: str) -> BlockStack:
        """The stack held in ``model.<attribute>``."""
        for stack in self.block_stacks:
            if stack.attribute == attribute:
                return stack
        known = ", ".join(s.attribute for s in self.block_stacks)
        raise ConfigError(f"{self.model_class_name} has no block stack {attribute!r}; stacks: {known}")

    def original_layout(self, config) -> dict[str, OriginalTensor]:
        """Tensor name -> :class:`OriginalTensor` of the family's original (non-diffusers) checkpoint, for a model
        of ``config``; families without one (``original_arch is None``) are written with diffusers names."""
        raise UnsupportedModelError(f"compressdit knows no original (non-diffusers) layout for "
                                    f"{self.model_class_name}; write diffusers names instead")

    def original_geometry_issue(self, config) -> str | None:
        """Why the stock loaders of the original layout (diffusers' single-file converter, ComfyUI) cannot build a
        model of ``config`` from it (they assume the released models' geometry), or ``None`` when they can."""
        return None

    def diffusers_reads_original(self, config) -> bool:
        """Whether diffusers' single-file converter rebuilds a model of ``config`` from the original layout."""
        return True

    def latent_shape(self, model: nn.Module) -> tuple[int, ...]:
        """Latent shape of one sample (``[C, H, W]`` for images; video families add a frame axis)."""
        size = model.config.sample_size
        return model.config.in_channels, size, size

    @abstractmethod
    def encode(self, model: nn.Module, conditions: list[Any]) -> Conditioning:
        """Turn class ids / prompts into model inputs."""

    def synthetic_conditioning(self, model: nn.Module, batch: int, seed: int = 0) -> Conditioning | None:
        """Seeded random conditions of the model's input shapes, needing no text encoder (reload checks, tests,
        benchmarks): class ids below ``num_embeds_ada_norm`` (or 1000), or text tokens of the config's widths.
        ``None`` where the adapter cannot build the model's inputs (then checkpoints are compared tensor by tensor).
        """
        gen = torch.Generator().manual_seed(seed)
        if self.condition_kind == "class":
            classes = model.config.get("num_embeds_ada_norm") or 1000
            return self.encode(model, torch.randint(0, classes, (batch,), generator=gen).tolist())
        if self.text_width_key is None:
            raise ConfigError(f"the {self.family} adapter names no text width config key (text_width_key)")
        pooled = model.config[self.pooled_width_key] if self.pooled_width_key else None
        tokens = model.config[self.text_length_key] if self.text_length_key else self.synthetic_tokens
        return self.encode(model, synthetic_text(batch, tokens, model.config[self.text_width_key], pooled, seed=seed))

    @abstractmethod
    def null_conditions(self, count: int) -> list[Any]:
        """The unconditional inputs used for classifier-free guidance."""

    @abstractmethod
    def predict(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """One forward pass returning the prediction with the latents' shape."""

    def prompt_embeddings(self, pipeline, prompts: list[str], device: torch.device) -> list:
        """``TextEmbedding``s of ``prompts`` from a loaded diffusers pipeline's own ``encode_prompt`` (its text
        encoders only; no classifier-free guidance pair): how its outputs map to tokens / mask / pooled."""
        raise UnsupportedModelError(f"{self.model_class_name}: compressdit does not know how this family's pipeline "
                                    "encodes prompts; pass --embeddings FILE with precomputed embeddings")

    def image_tokens(self, model: nn.Module, latents: torch.Tensor) -> int:
        """How many image tokens the model sees for ``latents`` (drives schedulers' dynamic shifting)."""
        patch = model.config.get("patch_size") or 1
        return (latents.shape[-2] // patch) * (latents.shape[-1] // patch)

    def set_timesteps(self, model: nn.Module, scheduler, steps: int, latents: torch.Tensor, device) -> None:
        """``scheduler.set_timesteps`` as this family's diffusers pipeline calls it; a scheduler with
        ``use_dynamic_shifting`` gets ``mu`` from the image token count (``calculate_shift``, as SD3's does)."""
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            kwargs["mu"] = dynamic_shift(scheduler, self.image_tokens(model, latents))
        scheduler.set_timesteps(steps, device=device, **kwargs)

    def scheduler(self, model: nn.Module):
        """The diffusers scheduler used for sampling when the model folder brings none."""
        from diffusers import DPMSolverMultistepScheduler

        return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")


def dynamic_shift(scheduler, image_tokens: int) -> float:
    """``mu`` for a dynamically shifting scheduler, from its config as diffusers' pipelines compute it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def call_default(pipeline, name: str):
    """The default of ``name`` in the pipeline's ``__call__`` (what a stock call passes to ``encode_prompt``)."""
    return inspect.signature(type(pipeline).__call__).parameters[name].default


ADAPTERS: Registry[ModelAdapter] = Registry("model family")
