"""The fused CPU MoE layer (compressdit.moe.cpu_native): bit for bit the PyTorch path's output at one thread, on
random routing, experts without tokens, top-1 / top-2, with and without a shared expert or bias, unit and softmax
gates, at 1 and 2 threads; the PyTorch path where the library is unavailable or autograd is on."""

from __future__ import annotations

import pytest
import torch

import compressdit.moe.cpu_native as cpu_native
import compressdit.moe.layers as layers
from tests.moe.test_moe_layers import _per_token
from tests.conftest import torch_threads
from tests.moe.test_moe_stacked import _layer

needs_library = pytest.mark.skipif(cpu_native.native_library() is None,
                                   reason="no C compiler or no MKL in torch: only the PyTorch path runs here")
CASES = [{}, {"top_k": 1}, {"shared_hidden": 0}, {"shared_hidden": 12}, {"bias": False},
         {"shared_hidden": 0, "bias": False}, {"gating": "softmax"}, {"gating": "softmax", "top_k": 1}]


def _pytorch_path(layer: layers.MoEFeedForward, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        patch.setattr(layers, "moe_ffn", lambda *args, **kwargs: None)
        return layer(x)


class _Phases:
    """The native library, recording the phases of each compressdit_moe_ffn call."""

    def __init__(self, lib) -> None:
        self.lib, self.phases = lib, []

    def __getattr__(self, name: str):
        return getattr(self.lib, name)

    def compressdit_moe_ffn(self, *args) -> None:
        self.phases.append(args[2])
        self.lib.compressdit_moe_ffn(*args)


def _native(layer: layers.MoEFeedForward, x: torch.Tensor, monkeypatch) -> tuple[torch.Tensor, list[int]]:
    """The layer's output, asserting that the native pass computed it, and the phases of its C calls."""
    recorder = _Phases(cpu_native.native_library())
    with monkeypatch.context() as patch:
        patch.setattr(cpu_native, "native_library", lambda: recorder)
        out = layer(x)
    assert recorder.phases, "the native pass did not run"
    return out, recorder.phases


def _check(layer: layers.MoEFeedForward, x: torch.Tensor, threads: int, monkeypatch,
           reference_threads: int = 1) -> list[int]:
    """The native output equals the PyTorch path's on ``reference_threads`` threads bit for bit; the phases of its C
    calls."""
    with torch.no_grad():
        with torch_threads(reference_threads):
            reference = _pytorch_path(layer, x, monkeypatch)
        with torch_threads(threads):
            out, phases = _native(layer, x, monkeypatch)
            pytorch_here = _pytorch_path(layer, x, monkeypatch)
        assert torch.equal(out, reference)
        # with 2 threads MKL may round a 1-3-row matmul differently once torch splits it; the fused pass never does
        torch.testing.assert_close(out, pytorch_here, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, _per_token(layer, x), rtol=1e-5, atol=1e-5)
    return phases


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("overrides", CASES)
def test_native_equals_pytorch_path_on_random_routing(overrides: dict, threads: int, monkeypatch) -> None:
    layer = _layer(**overrides)
    _check(layer, torch.randn(5, 9, 16), threads, monkeypatch)


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tokens, top_k, fused", [(45, 2, True), (600, 2, True), (1025, 1, False)])
def test_fused_gelu_where_torch_computes_every_element_vectorized(tokens: int, top_k: int, fused: bool, threads: int,
                                                                  monkeypatch) -> None:
    """Hidden widths of 32: one C call with the GELU inside, unless torch's split of the activation leaves elements
    to its scalar code (1025 x 32 elements in two chunks of 16,400 at two threads, 16 elements past a 32 step)."""
    layer = _layer(expert_hidden=32, shared_hidden=32, top_k=top_k, activation="gelu-tanh")
    # unfused, the activation is torch's, whose split over threads decides which elements take its scalar code
    phases = _check(layer, torch.randn(tokens, 16), threads, monkeypatch, reference_threads=1 if fused else threads)
    one_call = [cpu_native.UP | cpu_native.DOWN]
    if not cpu_native.native_library().fused_gelu:
        assert phases == [cpu_native.UP, cpu_native.DOWN]
    else:
        assert (phases == one_call) == (fused or threads == 1)


@needs_library
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("top_k, favoured", [(1, [2]), (2, [0, 3])])
def test_experts_without_tokens(top_k: int, favoured: list[int], threads: int, monkeypatch) -> None:
    layer = _layer(top_k=top_k)
    with torch.no_grad():  # every token to the favoured experts: the others get no rows
        layer.router.weight.mul_(1e-3)
        layer.router.bias.fill_(0.0)
        layer.router.bias[favoured] = 10.0
    x = torch.randn(3, 11, 16)
    _check(layer, x, threads, monkeypatch)
    with torch.no_grad():
        chosen = layer.router(x.reshape(-1, 16)).topk(top_k).indices
    assert set(chosen.unique().tolist()) == set(favoured)


def test_pytorch_path_where_the_library_is_unavailable(monkeypatch) -> None:
    layer = _layer()
    x = torch.randn(4, 6, 16)
    build = cpu_native.native_library.__wrapped__  # the uncached builder
    with torch.no_grad():
        expected = _pytorch_path(layer, x, monkeypatch)
        monkeypatch.setattr(cpu_native, "native_library", lambda: None)
        out = layer(x)
    assert torch.equal(out, expected) and layer._stacked is not None  # the stacked PyTorch path served it
    monkeypatch.setenv("COMPRESSDIT_NATIVE_CPU", "0")
    assert build() is None
    monkeypatch.delenv("COMPRESSDIT_NATIVE_CPU")
    monkeypatch.setattr(cpu_native, "mkl_sgemm", lambda: None)  # a torch on another BLAS
    assert build() is None


def test_autograd_and_other_dtypes_take_the_pytorch_path(monkeypatch) -> None:
    layer = _layer()
    x = torch.randn(2, 5, 16)
    monkeypatch.setattr(layers, "moe_ffn", lambda *args, **kwargs: pytest.fail("fused pass under autograd"))
    assert layer(x).requires_grad
    with torch.no_grad():
        assert cpu_native.moe_ffn(x.reshape(-1, 16).double(), (layer.router.weight, layer.router.bias), 2, None,
                                  layer._stacked_for(layer._plain_experts()), layer.bias, torch.nn.functional.gelu,
                                  "gelu", None) is None  # float64: not the library's dtype
