"""The tanh GELU after a quantized layer, in one native pass.

PyTorch's CPU tanh GELU costs ~1.5 ns an element on the Intel Xeon of ``bench/results/e2e_speed_cpu_xeon.md`` (its
vectorized ``tanh``), 5x its erf GELU: on a zoo model's 256 x 512 MLP activations 196 us a call at one thread, more
than the int8 GEMM in front of it. So where :func:`compressdit.quant.transform.set_module` puts a quantized layer in front of
a tanh GELU, that GELU module has its class swapped (same attributes, children, hooks and state dict) for the
subclass here, whose fp32 CPU tensors go through :func:`compressdit.quant.cpu_native.gelu_tanh` (~0.4 ns an element,
within a few ulp of the exact function, where torch's ``1 + tanh`` loses relative precision for negative inputs);
bf16 ones too (the fp32 function rounded to bf16 once: torch's bf16 tanh GELU took 26.8 ms a call on a DiT-XL/2
MLP's activations at batch 8); anything else (erf GELU, fp16, CUDA, gradients, ``torch.compile``) runs the original. A float layer put back swaps
it back. The modules: diffusers' GELU projection (``FeedForward.net[0]``: ``gelu(proj(x))``) when its ``proj`` is
replaced, and an ``nn.GELU`` an adapter names as a :class:`~compressdit.models.base.ParallelMLP`'s activation when
that MLP's up projection is. Where the quantized layer's kernel can apply the GELU in its own epilogue (the fused int8
op), :class:`NativeGELU` has it do so.
"""

from __future__ import annotations

import torch
from diffusers.models.activations import GELU
from torch import nn
from torch.nn.modules import module as hooks  # the global hook dicts

from compressdit.quant.cpu_native import gelu_tanh


def _native(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu


def _called_plainly(module: nn.Module) -> bool:
    """Whether calling ``module``'s methods directly skips nothing its ``__call__`` would run: no hooks of its own
    or global ones, no wrapped ``forward`` (accelerate's), not under ``torch.compile``."""
    return not (torch.compiler.is_compiling() or module._forward_hooks or module._forward_pre_hooks
                or module._backward_hooks or module._backward_pre_hooks or "forward" in module.__dict__
                or "_hf_hook" in module.__dict__ or hooks._global_forward_hooks or hooks._global_forward_pre_hooks
                or hooks._global_backward_hooks or hooks._global_backward_pre_hooks)


class NativeGELU(GELU):
    """diffusers' :class:`~diffusers.models.activations.GELU` with the tanh GELU of fp32 / bf16 CPU tensors in C: in the
    quantized ``proj``'s own epilogue where its kernel has one (``forward_activated``: the int8 GEMM op activates
    each block of rows while it is in cache) and nothing would see ``proj``'s output alone (no hooks), else as a
    pass after it."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh" and _native(hidden_states) and _called_plainly(self.proj):
            out = getattr(self.proj, "forward_activated", lambda x, a: None)(hidden_states, "gelu-tanh")
            if out is not None:
                return out
            out = self.proj(hidden_states)  # GELU.forward's two steps; nothing else holds proj's output (no hooks)
            return gelu_tanh(out, inplace=True) if _native(out) else self.gelu(out)
        return super().forward(hidden_states)

    def gelu(self, gate: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(gate) if self.approximate == "tanh" and _native(gate) else super().gelu(gate)


class NativeTorchGELU(nn.GELU):
    """``nn.GELU`` with the tanh GELU of fp32 / bf16 CPU tensors in C."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.GELU's argument name)
        return gelu_tanh(input) if self.approximate == "tanh" and _native(input) else super().forward(input)


NATIVE = {GELU: NativeGELU, nn.GELU: NativeTorchGELU}
ORIGINAL = {native: original for original, native in NATIVE.items()}


def swap_activation(module: nn.Module, native: bool) -> None:
    """Give a tanh GELU module its native class (``native``) or its original one back; other modules: unchanged."""
    if native and type(module) in NATIVE and getattr(module, "approximate", None) == "tanh":
        module.__class__ = NATIVE[type(module)]
    elif not native and type(module) in ORIGINAL:
        module.__class__ = ORIGINAL[type(module)]
