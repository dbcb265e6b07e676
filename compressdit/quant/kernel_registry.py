"""Execution kernels of quantized linears: registered per format/spec/device, chosen per layer.

A :class:`Kernel` runs a layer's forward from *runtime buffers* that its ``prepack`` builds once from
the layer's saved tensors (packed codes, scales). The buffers are never saved and never moved: they
live in the layer's :class:`KernelCache` (a plain attribute, so not in ``state_dict`` nor touched by
``.to()``), are dropped by ``_apply`` (``.to()``, ``.float()``, ...) and are rebuilt on the next eager
forward whenever a saved tensor changed (``load_state_dict``, accelerate/diffusers assigning loaded
tensors, ``load_codes``, a device move) or torch's intra-op thread count changed (a kernel may choose by it).
Checkpoints therefore stay portable. The layer class's
dequantize-then-matmul reference is the fallback (no kernel applies) and the ground truth every kernel
is tested against (and what runs when gradients flow to the inputs); ``layer.kernel_name`` says which one runs (``"reference"`` for the fallback).

Each kernel's math is a ``torch.library`` custom op (namespace ``compressdit``) with a fake impl, so
``torch.compile`` traces a quantized layer without graph breaks. Under compilation the staleness check
is skipped: run one eager forward (or :func:`prepack_model`) before compiling.

Joining the registry (as :mod:`compressdit.quant.cpu_kernels` and :mod:`compressdit.quant.cuda_kernels` do)::

    from compressdit.quant.kernel_registry import KERNELS, Kernel

    KERNELS.add("cuda-int8-mm", Kernel(
        applies=lambda spec, device, shape: device.type == "cuda" and spec.w_bits == 8 and spec.a_bits == 8,
        prepack=lambda layer: {"codes_t": layer.weight.data.t().contiguous()},  # tensors for the op
        run=lambda layer, x, buffers: torch.ops.compressdit.my_int8_op(x, buffers["codes_t"], ...),
        priority=10, description="int8 x int8 -> int32 cuBLASLt GEMM, per-token activation scales"))

then add the module to :data:`KERNEL_MODULES` so it is imported before the first selection. ``run``
receives the activations after the layer's input transform (balancing/rotation); among the kernels
that apply, the highest ``priority`` wins.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
import functools
from operator import is_, itemgetter
from typing import Any, Callable

import torch
from torch import nn

from compressdit.registry import Registry

#: Modules that register kernels; imported (once) before the first kernel selection.
KERNEL_MODULES: tuple[str, ...] = ("compressdit.quant.cpu_kernels", "compressdit.quant.cpu_dense",
                                   "compressdit.quant.cuda_kernels")
REFERENCE = "reference"


@dataclass(frozen=True)
class Kernel:
    """``applies(spec, device, (out_features, in_features))`` -> bool; ``prepack(layer)`` -> runtime
    tensors; ``run(layer, x, buffers)`` -> output for transformed activations ``x``."""

    applies: Callable[[Any, torch.device, tuple[int, int]], bool]
    prepack: Callable[[nn.Module], dict[str, Any]]
    run: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor]
    description: str
    priority: int = 0
    #: optional ``run`` on the layer's input *before* its balancing/rotation (which it applies itself, e.g. the
    #: balancing division fused into its activation quantization); layers with a low-rank branch use ``run`` and add
    #: the branch themselves, except where the buffers hold ``LOW_RANK`` (:func:`runs_low_rank`): this runs it too
    run_untransformed: Callable[[nn.Module, torch.Tensor, dict[str, Any]], torch.Tensor] | None = None
    #: optional ``run_untransformed`` whose output goes through an activation (``"gelu-tanh"``) in the kernel's own
    #: epilogue: ``(layer, x, buffers, activation)`` -> the activated output, or ``None`` where it has no such path
    run_activated: Callable[[nn.Module, torch.Tensor, dict[str, Any], str], torch.Tensor | None] | None = None
    #: optional ``direct(layer, buffers)``, called once a prepack is made: the layer's whole forward as one
    #: ``run(layer, x)`` on the untransformed input (its balancing, rotation and any low-rank branch included) with
    #: what depends on the layer alone checked here, not per call, or ``None`` where the layer has a step it leaves
    #: out. ``run`` returns ``None`` for an input it does not take (the layer's usual path then runs). Called from the
    #: layer's ``forward`` before any of the registry's Python (:func:`direct_output`): inside a zoo step that path
    #: cost more than LRQ's activation pass itself.
    direct: Callable[[nn.Module, dict[str, Any]], Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None] \
        | None = None


KERNELS: Registry[Kernel] = Registry("kernel")
#: the buffer (not ``None``) by which a kernel says its ``run_untransformed`` runs the layer's low-rank branch too
LOW_RANK = "low_rank"
_imported = False


def _import_kernel_modules() -> None:
    global _imported
    if not _imported:
        for module in KERNEL_MODULES:
            importlib.import_module(module)
        _imported = True


def select_kernel(spec, device: torch.device, shape: tuple[int, int]) -> str:
    """Name of the highest-priority kernel that applies, else ``"reference"``."""
    _import_kernel_modules()
    fits = [(kernel.priority, name) for name, kernel in KERNELS.items() if kernel.applies(spec, device, shape)]
    return max(fits)[1] if fits else REFERENCE


class KernelCache:
    """A layer's chosen kernel and its prepacked buffers; copies and pickles empty (rebuilt on demand)."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.kernel: Kernel | None = None
        self.key: StateKey | None = None
        self.buffers: dict[str, Any] = {}
        self.override: str | None = None
        #: the kernel's ``direct`` run for these buffers (:func:`direct_output`), or ``None``
        self.direct: Callable[[nn.Module, torch.Tensor], torch.Tensor | None] | None = None

    def __deepcopy__(self, memo) -> "KernelCache":
        fresh = KernelCache()
        fresh.override = self.override
        return fresh

    def __reduce__(self):
        return KernelCache, ()

    def clear(self) -> None:
        self.name, self.kernel, self.key, self.buffers, self.direct = None, None, None, {}, None

    def nbytes(self) -> int:
        """Bytes of the buffers beyond the layer's own tensors (a buffer may be one of them, e.g. int8 codes), each
        storage once (a buffer may be a view of another, e.g. a weight's columns of a wider one)."""
        own = set(self.key.state[0]) if self.key is not None else set()
        storages = {}
        for t in self.buffers.values():
            if isinstance(t, torch.Tensor) and not t.is_mkldnn and t.data_ptr() not in own:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())


# C-level readers mapped over a layer's saved tensors (no Python frame per tensor)
_DATA_PTR, _VERSION = torch.Tensor.data_ptr, torch.Tensor._version.__get__


@dataclass(frozen=True)
class StateKey:
    """What a prepack was built from, checked before every eager forward. Stale when torch's intra-op thread count
    changed (kernels may choose by it), a name was registered or removed (the module dicts' sizes), the object
    under a name changed (accelerate / diffusers assign loaded tensors), or a saved tensor's version counter
    (in-place writes: ``load_state_dict``'s ``copy_``, ``mul_``) or storage (``.data =``, a move: its data_ptr)
    changed. ``storage`` holds each prepacked storage alive (a detached alias) so that a later allocation can never
    reuse its address. A dtype change comes with a new storage; not seen: ``.data =`` a view of the same storage as
    another dtype, and writes through ``t.data[...]`` (``.data`` has a version counter of its own).

    Cost inside a zoo model's W8A8 step at 2 threads (dit-fmnist, 84 layers, against no check at all): 0.9-1.2 ms
    a step, the former key (each saved name looked up through the module's three dicts, then data_ptr, version and
    dtype read per tensor) 1.4 ms; the dtype reads were about 0.5 ms of it. Inside a step any per-forward check
    costs ~8 us a layer (three variants of this one measured within noise of each other)."""

    threads: int
    sizes: tuple[int, int]
    names: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]  # in _parameters, _buffers, __dict__
    objects: tuple  # what the names held: tensors, or None
    tensors: tuple[torch.Tensor, ...]
    storage: tuple[torch.Tensor, ...]
    state: tuple[tuple[int, ...], tuple[int, ...]]  # data_ptrs, versions
    #: ``fetch(layer)`` -> the objects under ``names`` now (one C-level ``itemgetter`` when all are parameters)
    fetch: Callable[[nn.Module], tuple]
    #: the tensors with a version counter: all but inference tensors (a model built under ``torch.inference_mode``),
    #: whose in-place writes go unseen; ``tensors`` itself where there are none
    versioned: tuple[torch.Tensor, ...]

    @classmethod
    def of(cls, layer: nn.Module) -> "StateKey":
        # every tensor a prepack may read: the saved codes and scales, and the layer's own float parameters and
        # buffers (the bias, SVDQuant's low-rank factors: written in place by a training step)
        names = tuple(dict.fromkeys((*layer.quantized_tensors, "bias", *layer._parameters, *layer._buffers)))
        homes = (layer._parameters, layer._buffers)
        where = tuple(tuple(n for n in names if _home(homes, n) == i) for i in range(3))
        objects = _objects(layer, where)
        tensors = tuple(t for t in objects if isinstance(t, torch.Tensor))
        versioned = tensors if not any(t.is_inference() for t in tensors) else tuple(
            t for t in tensors if not t.is_inference())
        return cls(torch.get_num_threads(), (len(layer._parameters), len(layer._buffers)), where, objects, tensors,
                   tuple(t.detach() for t in tensors), _tensor_state(tensors, versioned), _fetcher(where), versioned)

    def holds_for(self, layer: nn.Module) -> bool:
        return (self.threads == torch.get_num_threads()
                and self.sizes == (len(layer._parameters), len(layer._buffers))
                and all(map(is_, self.fetch(layer), self.objects))
                and self.state == _tensor_state(self.tensors, self.versioned))


def _fetcher(names: tuple[tuple[str, ...], ...]) -> Callable[[nn.Module], tuple]:
    """What :func:`_objects` reads, as one ``itemgetter`` over ``_parameters`` where every name lives there (the
    saved tensors of every quantized layer are parameters: 2 us less per forward than three dict walks)."""
    in_parameters, in_buffers, in_attributes = names
    if in_buffers or in_attributes or len(in_parameters) < 2:
        return functools.partial(_objects, names=names)
    get = itemgetter(*in_parameters)
    return lambda layer: get(layer._parameters)


def _home(homes: tuple[dict, dict], name: str) -> int:
    return next((i for i, home in enumerate(homes) if name in home), 2)


def _objects(layer: nn.Module, names: tuple[tuple[str, ...], ...]) -> tuple:
    in_parameters, in_buffers, in_attributes = names
    return (*map(layer._parameters.get, in_parameters), *map(layer._buffers.get, in_buffers),
            *map(layer.__dict__.get, in_attributes))


def version_of(t: torch.Tensor) -> int:
    """``t``'s version counter (in-place writes), 0 for an inference tensor (made under ``torch.inference_mode``:
    it has none, so its in-place writes go unseen)."""
    return 0 if t.is_inference() else t._version


def _tensor_state(tensors: tuple[torch.Tensor, ...],
                  versioned: tuple[torch.Tensor, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    with torch._C.DisableTorchFunctionSubclass():  # reads on Parameter subclasses cost 2x more without
        return tuple(map(_DATA_PTR, tensors)), tuple(map(_VERSION, versioned))


def prepacked_bias(layer: nn.Module) -> torch.Tensor | None:
    """The layer's bias as a contiguous fp32 tensor for a kernel's buffers (the parameter itself where it is one
    already), or ``None``."""
    return None if layer.bias is None else layer.bias.detach().float().contiguous()


def cache_of(layer: nn.Module) -> KernelCache:
    cache = layer.__dict__.get("_kernel_cache")
    if cache is None:
        cache = KernelCache()
        layer.__dict__["_kernel_cache"] = cache
    return cache


def kernel_name_of(layer: nn.Module) -> str:
    """The kernel ``layer`` runs on its current device (without prepacking)."""
    override = cache_of(layer).override
    if override is not None:
        return override
    return select_kernel(layer.spec, layer.weight.device, (layer.out_features, layer.in_features))


def refresh(layer: nn.Module) -> KernelCache:
    """Select and prepack again when the layer's saved tensors changed since the last prepack (:class:`StateKey`)."""
    cache = cache_of(layer)
    if cache.key is None or not cache.key.holds_for(layer):
        # the no_grad context only here: entering it costs ~10 us, per call of every layer; autocast off: a prepack's
        # matmuls (folded rotations, decoded weights) would otherwise be rounded to its dtype for good
        with torch.no_grad(), autocast_off(layer.weight.device.type):
            cache.clear()
            key = StateKey.of(layer)
            name = kernel_name_of(layer)
            if name != REFERENCE:
                cache.kernel = KERNELS.get(name)
                cache.buffers = cache.kernel.prepack(layer)
                if cache.kernel.direct is not None:
                    cache.direct = cache.kernel.direct(layer, cache.buffers)
            cache.name, cache.key = name, key
    return cache


def direct_output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output from its prepacked kernel's ``direct`` run (:attr:`Kernel.direct`), or ``None`` where the
    layer's usual path must run: no prepack yet or a stale one (:class:`StateKey`), no direct run, a gradient to keep
    (:func:`needs_autograd`: the usual path gives the reference's), autocast on, ``torch.compile`` tracing, or an input
    the run does not take. Only checks that cost well under a microsecond come before the state key's (~4 us a layer
    alone, 10-15 inside a step)."""
    if torch.compiler.is_compiling():  # first: traced, the rest of this function is not
        return None
    cache = layer.__dict__.get("_kernel_cache")
    if (cache is None or cache.direct is None or needs_autograd(layer, x) or torch._C._is_any_autocast_enabled()
            or not cache.key.holds_for(layer)):
        return None
    return cache.direct(layer, x)


def needs_autograd(layer: nn.Module, x: torch.Tensor) -> bool:
    """Grad mode on and a gradient to keep: ``x`` requires grad, or one of the layer's own parameters trains (its
    bias, SVDQuant's branch factors: they get the reference's gradient)."""
    return torch.is_grad_enabled() and (x.requires_grad or trains(layer))


def trains(layer: nn.Module) -> bool:
    """Whether one of ``layer``'s own parameters requires grad."""
    return any(p is not None and p.requires_grad for p in layer._parameters.values())


def kernel_cache(layer: nn.Module, x: torch.Tensor) -> KernelCache | None:
    """The layer's prepacked kernel for input ``x``, or ``None`` for the reference path (also when gradients
    must flow (:func:`needs_autograd`): the kernels have no backward, the reference has; and for an input of no
    rows)."""
    if needs_autograd(layer, x) or x.numel() == 0:  # (no rows: the reference's empty output)
        return None
    cache = cache_of(layer) if torch.compiler.is_compiling() else refresh(layer)
    return None if cache.kernel is None else cache


class _KernelForwardReferenceBackward(torch.autograd.Function):
    """The layer's ``kernel_forward`` output forward (``forward`` runs with grad mode off: its kernel path);
    backward, the gradient the reference gives its input, recomputed from the saved input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        ctx.save_for_backward(x)
        return layer.kernel_forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            out = ctx.layer.reference_forward(leaf)
        return torch.autograd.grad(out, leaf, grad)[0], None


def kernel_with_reference_grad(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """For an ``x`` gradients must reach (the caller checks: an adapter upstream trains, or a plain call with grad
    mode on and float parameters that require grad before the layer), where none of the layer's own tensors trains:
    ``layer.kernel_forward``'s output, with the reference's gradient to ``x`` computed in backward (only if one runs).
    ``None`` otherwise (a layer tensor that trains, no kernel, or under ``torch.compile``: the caller runs the
    reference, as before). Without it every such call ran the dequantize reference: a dit-fmnist forward at batch 8
    with its float parameters trainable (one thread, no backward) took W4A8 39.2 ms, NVFP4 73.4, now 23.5 and 32.7
    (no_grad: 13.8, 16.3)."""
    if torch.compiler.is_compiling() or kernel_name_of(layer) == REFERENCE or trains(layer):
        return None
    return _KernelForwardReferenceBackward.apply(x, layer)


def run_cached(layer: nn.Module, cache: KernelCache, x: torch.Tensor, untransformed: bool = False) -> torch.Tensor:
    """Run the cached kernel (``untransformed``: its variant that applies the layer's input transform itself).
    A layer accelerate offloads after this call (``device_map`` with cpu/disk) drops its prepacked copy too."""
    run = cache.kernel.run_untransformed if untransformed else cache.kernel.run
    out = without_autocast(run, x, layer, x, cache.buffers)
    # accelerate's hook is a plain attribute: read from __dict__ (a missing-attribute getattr on a module costs ~2 us)
    if not torch.compiler.is_compiling() and getattr(layer.__dict__.get("_hf_hook"), "offload", False):
        cache.clear()
    return out


def without_autocast(run: Callable[..., torch.Tensor], x: torch.Tensor, *args) -> torch.Tensor:
    """``run(*args)`` with autocast off on ``x``'s device where it is on: a kernel computes in the precision of its
    format and returns ``x``'s dtype; under autocast, torch's matmuls inside it (SVDQuant's down-projection, fp32
    GEMMs before a C epilogue) would come back in autocast's dtype, which C code then read as fp32 (NaN or wrong
    outputs under ``torch.autocast("cpu", dtype=torch.bfloat16)``)."""
    # any autocast first: 0.16 us a call, where the device's own check costs 0.56 (its device type string)
    if not torch._C._is_any_autocast_enabled():
        return run(*args)
    with autocast_off(x.device.type):
        return run(*args)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context with autocast off on ``device_type`` where it is on (a no-op elsewhere, e.g. on ``meta``)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def runs_low_rank(cache: KernelCache) -> bool:
    """Whether the cached kernel's ``run_untransformed`` runs the whole layer, its low-rank branch included."""
    return cache.buffers.get(LOW_RANK) is not None


def run_kernel(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The chosen kernel's output for transformed activations ``x``, or ``None`` for the reference path."""
    cache = kernel_cache(layer, x)
    return None if cache is None else run_cached(layer, cache, x)


def set_kernel(model: nn.Module, name: str | None) -> None:
    """Force every quantized layer of ``model`` onto kernel ``name`` (e.g. ``"reference"``); ``None`` = auto."""
    if name not in (None, REFERENCE):
        _import_kernel_modules()
        KERNELS.get(name)
    for module in model.modules():
        if hasattr(module, "spec") and hasattr(module, "quantized_tensors"):
            cache = cache_of(module)
            cache.clear()
            cache.override = name


def prepack_model(model: nn.Module) -> dict[str, str]:
    """Prepack every quantized layer now (e.g. before ``torch.compile``); returns layer name -> kernel."""
    chosen = {}
    for name, module in model.named_modules():
        if hasattr(module, "spec") and hasattr(module, "quantized_tensors"):
            chosen[name] = refresh(module).name
    return chosen


def kernel_summary(model: nn.Module) -> str:
    """``"cpu-int8-gemm x24, reference x4"``: how many quantized layers run each kernel ("" when none)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if hasattr(module, "spec") and hasattr(module, "quantized_tensors"):
            name = kernel_name_of(module)
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in sorted(counts.items()))
