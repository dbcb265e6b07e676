"""Quantized linear modules: the shared base class and the integer format (packed codes, fp32 scales)."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compressdit.quant.kernel_registry import (cache_of, direct_output, kernel_cache, kernel_name_of,
                                              kernel_with_reference_grad, run_cached, run_kernel, runs_low_rank,
                                              without_autocast)
from compressdit.quant.activations import quantize_input
from compressdit.quant.gpu_reference import pack_nibbles
from compressdit.quant.low_rank import low_rank_split
from compressdit.quant.primitives import (dequantize_weight, pack_codes, packed_shape, quantize_weight_rtn,
                                          unpack_codes)
from compressdit.quant.rotation import balancing_scale, fwht, hadamard_block, random_signs, rotate
from compressdit.quant.rounding import ROUNDINGS, transformed_hessian
from compressdit.quant.spec import LinearQuantSpec


# True inside ``logical_weight_shapes()``: packed weights then report their logical ``[out, in]`` shape
_LOGICAL_SHAPES: ContextVar[bool] = ContextVar("compressdit_logical_weight_shapes", default=False)


@contextmanager
def logical_weight_shapes() -> Iterator[None]:
    """Within the block, every :class:`PackedParameter` reports ``.shape`` as its layer's ``[out, in]`` (what a
    float ``nn.Linear`` would have) instead of its storage shape; outside it, the storage shape, as always.

    For loaders that size layers by ``module.weight.shape`` and know only bitsandbytes' and GGUF's packed
    parameters, e.g. the Control-LoRA check of ``FluxPipeline.load_lora_weights`` (int4 / int2 / VQ codes
    are packed several to a byte)::

        with compressdit.logical_weight_shapes():
            pipe.load_lora_weights("my-lora")

    Scoped to the block and to this thread / task (a ``ContextVar``), never inside ``torch.compile``d code;
    nothing of diffusers is patched.
    """
    token = _LOGICAL_SHAPES.set(True)
    try:
        yield
    finally:
        _LOGICAL_SHAPES.reset(token)


class PackedParameter(nn.Parameter):
    """A frozen parameter of packed codes whose ``numel()`` counts logical weights, not bytes.

    ``logical_shape`` is the layer's ``(out_features, in_features)``; ``.shape`` reports it only inside
    :func:`logical_weight_shapes` (``size()`` and every op always see the stored codes).
    """

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False, logical_numel: int | None = None,
                logical_shape: tuple[int, int] | None = None):
        param = super().__new__(cls, data, requires_grad=False)
        param.logical_numel = logical_numel
        param.logical_shape = None if logical_shape is None else tuple(logical_shape)
        return param

    @classmethod
    def empty(cls, storage_shape: tuple[int, ...], dtype: torch.dtype, out_features: int, in_features: int,
              device=None) -> PackedParameter:
        """Zeroed storage for a layer of logical shape ``[out_features, in_features]`` (filled by loading)."""
        return cls(torch.zeros(storage_shape, dtype=dtype, device=device), logical_numel=out_features * in_features,
                   logical_shape=(out_features, in_features))

    def numel(self) -> int:  # diffusers' num_parameters() must match the unquantized model
        logical = getattr(self, "logical_numel", None)
        return super().numel() if logical is None else logical

    @property
    def shape(self) -> torch.Size:
        # is_compiling first, size() not super().shape: what dynamo traces when compiled kernels read .shape
        if not torch.compiler.is_compiling() and _LOGICAL_SHAPES.get() and getattr(self, "logical_shape", None):
            return torch.Size(self.logical_shape)
        return self.size()

    def __deepcopy__(self, memo):
        return PackedParameter(self.data.clone(), logical_numel=self.logical_numel, logical_shape=self.logical_shape)

    def __reduce_ex__(self, proto):
        return PackedParameter, (self.data, False, self.logical_numel, self.logical_shape)


class QuantState(nn.Parameter):
    """A frozen tensor of a quantized layer's state: scales, zero points, codebook, rotation signs.

    A parameter rather than a buffer, so that accelerate loads, offloads (to CPU or disk) and brings back
    each one together with its packed weight (``device_map`` with ``"disk"``, ``cpu_offload``); ``numel()``
    is 0 because it holds no model weights (``num_parameters()`` equals the unquantized model's), while
    ``nelement()`` still counts its elements for ``get_memory_footprint()``.
    """

    def __new__(cls, data: torch.Tensor, requires_grad: bool = False):
        return super().__new__(cls, data, requires_grad=False)

    def numel(self) -> int:
        return 0

    def __deepcopy__(self, memo):
        return QuantState(self.data.clone())

    def __reduce_ex__(self, proto):
        return QuantState, (self.data, False)


class QuantizedLinear(nn.Linear, metaclass=ABCMeta):
    """Base of every quantized linear: a packed ``weight`` plus the format's own tensors.

    ``quantized_tensors`` names the tensors the checkpoint stores as saved (never cast to the
    model's dtype); subclasses implement :meth:`effective_weight` (the base class's ``forward`` is then the
    dequantize reference) and, where a kernel exists, ``forward``, which runs the layer's registered kernel
    (:mod:`compressdit.quant.kernel_registry`) when one applies, else the reference; ``kernel_name`` says which.
    """

    quantized_tensors: ClassVar[tuple[str, ...]] = ("weight",)
    spec: LinearQuantSpec

    @abstractmethod
    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight in the layer's original input space."""

    def fp32_decoding(self) -> tuple | None:
        """How a kernel decodes this layer's fp32 weight (:meth:`effective_weight`'s, or :meth:`dequantized_weight`'s
        where the layer transforms its input) from the stored codes in one pass, bit for bit
        (:func:`~compressdit.quant.cpu_native.decode_f32` says the layouts): ``("nibbles", nibbles, lut, scale,
        zero)`` for 4-bit codes worth ``(lut[code] - zero) * scale`` per group, ``("bytes", codes, lut, row_scale)``
        for 8-bit ones, ``("vq", codes, bits, codebook, row_scale, in_features)`` for codeword indices; ``None`` where
        the format decodes otherwise."""
        return None

    def to_float_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the dequantized weight (activation quantization is dropped)."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(self.effective_weight(dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`kernel_forward`; where gradients must reach ``x``, its output with the reference's gradient
        (:func:`~compressdit.quant.kernel_registry.kernel_with_reference_grad`)."""
        out = direct_output(self, x)  # the prepacked kernel's whole layer in one run, where it has one
        if out is not None:
            return out
        if x.requires_grad and torch.is_grad_enabled():  # (inline: a call less per layer in inference)
            out = kernel_with_reference_grad(self, x)
            if out is not None:
                return out
        return self.kernel_forward(x)

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The registered kernel for this layer's format and device (VQ, minifloat weights), else the dequantize
        reference; formats with an input transform (balancing, rotation) override this."""
        out = run_kernel(self, x)
        return self.reference_forward(x) if out is None else out

    def forward_activated(self, x: torch.Tensor, activation: str) -> torch.Tensor | None:
        """``activation(self(x))`` (an :data:`~compressdit.moe.layers.ACTIVATIONS` name) with the activation in the
        kernel's epilogue, where this layer's kernel has that path for ``x``; ``None`` otherwise (the caller runs
        ``self(x)`` and the activation). Calls no hooks: callers check there are none."""
        prepacked = self.__dict__.get("_kernel_cache")
        if prepacked is not None and prepacked.kernel is not None and prepacked.kernel.run_activated is None:
            return None  # (its kernel has no such path: no second state check, the caller's call makes one)
        cache = kernel_cache(self, x)
        run = None if cache is None else cache.kernel.run_activated
        if run is None or getattr(self, "low_rank_up", None) is not None:
            return None
        return without_autocast(run, x, self, x, cache.buffers, activation)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ground truth every kernel is tested against (formats with an input transform override it)."""
        return self.reference_linear(x)

    def reference_linear(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize reference: fake-quantized input, decoded weight, matmul in ``x``'s dtype."""
        x = quantize_input(x, self.spec)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.effective_weight(x.dtype), bias)

    def _init_shape(self, in_features: int, out_features: int, spec: LinearQuantSpec) -> None:
        """How every quantized layer's ``__init__`` starts: ``nn.Linear``'s own would allocate a float weight."""
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.spec = in_features, out_features, spec

    def _init_bias(self, bias: bool, device, dtype) -> None:
        """The float bias (a frozen parameter in the model's dtype), or ``None``."""
        self.bias = nn.Parameter(torch.zeros(self.out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None

    def _optional_state(self, name: str, present: bool, value: torch.Tensor, device) -> None:
        setattr(self, name, QuantState(value.to(device)) if present else None)

    def fold_balancing(self, weight: torch.Tensor, input_absmax: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """With channel balancing (``spec.balance``): store the scale computed from the calibrated ``input_absmax``
        and return ``(weight * s, input_absmax / s)``; without it, both unchanged."""
        if self.smooth_scale is None:
            return weight, input_absmax
        if input_absmax is None:
            raise ValueError("channel balancing needs calibration statistics (run a calibrate stage)")
        absmax = input_absmax.to(weight.device)
        scale = balancing_scale(absmax, weight, self.spec.balance)
        self.smooth_scale.copy_(scale)
        return weight * scale, absmax / scale

    def _init_low_rank(self, device, dtype) -> None:
        """SVDQuant's 16-bit branch (``spec.low_rank``; in the model's float dtype, like the bias):
        ``out += (x @ low_rank_down^T) @ low_rank_up^T`` on the transformed, unquantized activations."""
        rank = self.spec.low_rank
        self.low_rank_down = None if not rank else nn.Parameter(
            torch.zeros(rank, self.in_features, device=device, dtype=dtype), requires_grad=False)
        self.low_rank_up = None if not rank else nn.Parameter(
            torch.zeros(self.out_features, rank, device=device, dtype=dtype), requires_grad=False)

    def split_low_rank(self, weight: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Store the rank-``spec.low_rank`` branch of ``weight`` (refined against ``quantize``, residual ->
        its dequantized value) and return the residual left to quantize; ``weight`` itself without a branch."""
        if not self.spec.low_rank:
            return weight
        split = low_rank_split(weight, self.spec.low_rank, quantize)
        self.low_rank_up.data.copy_(split.up)
        self.low_rank_down.data.copy_(split.down)
        return weight - split.up @ split.down

    def with_low_rank(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (fp32, transformed space) plus the branch's ``up @ down`` where there is one."""
        if self.low_rank_up is None:
            return weight
        return weight + self.low_rank_up.float() @ self.low_rank_down.float()

    def _add_low_rank(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The branch's output on the transformed, unquantized activations added to ``out`` (none without one)."""
        if self.low_rank_up is None:
            return out
        down, up = self.low_rank_down, self.low_rank_up
        if down.dtype is not x.dtype:
            down, up = down.to(x.dtype), up.to(x.dtype)
        hidden = F.linear(x, down)
        if out.dtype is not hidden.dtype or not out.is_contiguous():
            return out + F.linear(hidden, up)
        # the sum in the second GEMM (beta = 1): no separate pass over the output
        return torch.addmm(out.reshape(-1, out.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), up.t()).view(out.shape)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype outputs come in (the bias's, else float32): what peft casts a LoRA on this layer to,
        as for diffusers' GGUF / bitsandbytes 4-bit linears (an FP8 weight's own dtype cannot run a LoRA)."""
        return self.bias.dtype if self.bias is not None else torch.float32

    @property
    def kernel_name(self) -> str:
        """The registered kernel this layer runs on its device, or ``"reference"``."""
        return kernel_name_of(self)

    def _apply(self, fn, recurse: bool = True):
        """Device moves apply to every tensor; dtype casts (``layer.half()``, ``.to(torch.bfloat16)``, diffusers'
        layerwise casting to FP8 storage) skip :attr:`quantized_tensors`, which stay as saved, as when loading:
        an fp32 scale cast to FP8 and back is not the scale the codes were rounded with."""
        cache_of(self).clear()  # prepacked buffers belong to the old device/dtype: rebuilt on the next forward
        kept = {id(t) for t in (getattr(self, name, None) for name in self.quantized_tensors) if t is not None}

        def keeping_dtypes(tensor: torch.Tensor) -> torch.Tensor:
            applied = fn(tensor)
            if id(tensor) in kept and applied.dtype != tensor.dtype:
                return tensor.to(applied.device)
            return applied

        return super()._apply(keeping_dtypes, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.label}"


def _rtn(weight: torch.Tensor, spec: LinearQuantSpec):
    return quantize_weight_rtn(weight, spec.w_bits, spec.group_size, spec.w_symmetric, spec.w_range)


class QuantLinear(QuantizedLinear):
    """``nn.Linear`` with int weights (int8, or 2/4 codes per uint8) and per-channel/group fp32 scales.

    Activations are quantized on the fly (dynamic per token / per tensor, or a calibrated static
    scale). Reference path: dequantize the weight for this call only, then matmul.
    """

    quantized_tensors = ("weight", "weight_scale", "weight_zero", "input_scale", "smooth_scale", "rotation_signs")

    def __init__(self, in_features: int, out_features: int, bias: bool, spec: LinearQuantSpec,
                 device=None, dtype=None) -> None:
        self._init_shape(in_features, out_features, spec)
        shape, storage = packed_shape(out_features, in_features, spec.w_bits)
        self.weight = PackedParameter.empty(shape, storage, out_features, in_features, device)
        groups = in_features // spec.group_size if spec.group_size else 1
        if spec.group_size and in_features % spec.group_size:
            raise ValueError(f"in_features {in_features} is not divisible by group_size {spec.group_size}")
        self.weight_scale = QuantState(torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self._optional_state("weight_zero", not spec.w_symmetric,
                             torch.zeros(out_features, groups, dtype=torch.float32), device)
        self._optional_state("smooth_scale", spec.balance is not None, torch.ones(in_features), device)
        self._optional_state("rotation_signs", spec.rotation != "none",
                             torch.ones(in_features, dtype=torch.int8), device)
        if spec.rotation != "none" and in_features % 2:
            raise ValueError(f"a Hadamard rotation needs an even in_features, got {in_features}")
        self._optional_state("input_scale", spec.a_bits is not None and spec.a_granularity == "static",
                             torch.ones((), dtype=torch.float32), device)
        self._init_bias(bias, device, dtype)
        self._init_low_rank(device, dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec: LinearQuantSpec, input_absmax: torch.Tensor | None = None,
                    rotation_seed: int = 0, hessian: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize a float ``linear``: optional channel balancing and rotation folded in, an optional low-rank
        branch split off (SVDQuant: only the residual is quantized), then ``spec.rounding`` (GPTQ takes
        ``hessian``, the ``[in, in]`` ``2 X^T X`` of the layer's calibration inputs)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, spec,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        weight = linear.weight.detach().float()
        weight, input_absmax = module.fold_balancing(weight, input_absmax)
        if module.rotation_signs is not None:
            module.rotation_signs.copy_(random_signs(linear.in_features, rotation_seed))
            weight = rotate(weight, module.rotation_signs)
        if hessian is not None:
            hessian = transformed_hessian(hessian.to(weight.device), module.smooth_scale, module.rotation_signs)
        # the branch is refined against RTN of the residual (fast); the residual then rounds as the spec says
        weight = module.split_low_rank(weight, lambda w: _rtn(w, spec).dequantized())
        q = ROUNDINGS.get(spec.rounding).quantize(weight, spec, hessian)
        module.load_codes(q.codes, q.scale, q.zero)
        if module.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        if module.input_scale is not None:
            if input_absmax is None:
                raise ValueError("static activation scales need calibration statistics (run a calibrate stage)")
            module.input_scale.copy_(input_absmax.float().max().clamp_min(1e-8) / (2 ** (spec.a_bits - 1) - 1))
        return module

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the folded balancing and rotation to activations (identity when neither is used)."""
        if self.smooth_scale is not None:
            x = x / self.smooth_scale.to(x.dtype)
        if self.rotation_signs is not None:
            x = rotate(x, self.rotation_signs)
        return x

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight (plus the low-rank branch) mapped back to the layer's original input space."""
        weight = self.with_low_rank(self.dequantized_weight(torch.float32))
        if self.rotation_signs is not None:
            weight = fwht(weight, hadamard_block(self.in_features)) * self.rotation_signs.float()
        if self.smooth_scale is not None:
            weight = weight / self.smooth_scale
        return weight.to(dtype)

    def load_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> None:
        self.weight.data = pack_codes(codes, self.spec.w_bits).to(self.weight.device)
        self.weight_scale.copy_(scale)
        if self.weight_zero is not None:
            self.weight_zero.copy_(zero)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.weight.data, self.spec.w_bits, self.in_features)

    def offset_nibbles(self) -> torch.Tensor:
        """The codes + 8, two per byte, even column in the low nibble (the layout the int4 kernels' dequantize path
        reads, :func:`~compressdit.quant.gpu_reference.pack_nibbles`): at 4 bits the stored weight itself (its
        packing is that layout: no copy), at 2-3 bits a packed copy."""
        if self.spec.w_bits == 4:
            return self.weight.data
        return pack_nibbles(self.codes())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.weight_scale, self.weight_zero, dtype)

    def fp32_decoding(self) -> tuple | None:
        """Codes of up to 4 bits: the offset nibbles (``code + 8``), values ``nibble - 8``, the scales and zero points
        (:func:`~compressdit.quant.primitives.dequantize_weight`'s ``(q - zero) * scale``)."""
        if self.spec.w_bits > 4:
            return None
        return ("nibbles", self.offset_nibbles(), torch.arange(16, dtype=torch.float32) - 8,
                self.weight_scale.float().contiguous(),
                None if self.weight_zero is None else self.weight_zero.float().contiguous())

    def kernel_forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = kernel_cache(self, x)
        if cache is not None and cache.kernel.run_untransformed is not None and (self.low_rank_up is None
                                                                                or runs_low_rank(cache)):
            return run_cached(self, cache, x, untransformed=True)  # balancing (and the branch) in the kernel
        x = self.transform_input(x)
        out = None if cache is None else run_cached(self, cache, x)
        return self._add_low_rank(self.reference_linear(x) if out is None else out, x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The ground truth every kernel is tested against: transform, fake-quantize, dequantize, matmul."""
        x = self.transform_input(x)
        return self._add_low_rank(self.reference_linear(x), x)

    def reference_linear(self, x: torch.Tensor) -> torch.Tensor:
        """Reference on already transformed activations."""
        x = quantize_input(x, self.spec, self.input_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)
