"""Stacked-expert inference (one grouped matmul per projection) and the module fallback: same outputs as the
per-expert loop and the per-token reference, cache rebuilt when weights change, hooked experts still called."""

from __future__ import annotations

import pytest
import torch

import compressdit.moe.stacked as stacked
from compressdit.moe.layers import MoEFeedForward, MoELayout
from tests.moe.test_moe_layers import LAYOUT, _per_token


def _layer(**overrides) -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(MoELayout.from_dict({**LAYOUT, **overrides})).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return layer


def _loop(layer: MoEFeedForward, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    """The layer's output through the per-expert loop (no stacking)."""
    with monkeypatch.context() as patch:
        patch.setattr(stacked, "STACK_LIMIT_BYTES", 0)
        return layer(x)


@pytest.mark.parametrize("overrides", [{}, {"shared_hidden": 0}, {"bias": False}, {"top_k": 1},
                                       {"gating": "softmax"}])
def test_stacked_inference_matches_loop_and_per_token(overrides: dict, monkeypatch) -> None:
    layer = _layer(**overrides)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        out = layer(x)
        assert layer._stacked is not None  # served by the grouped matmuls
        torch.testing.assert_close(out, _loop(layer, x, monkeypatch), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out, _per_token(layer, x), rtol=1e-5, atol=1e-5)


def test_training_and_float64_do_not_stack(monkeypatch) -> None:
    layer = _layer()
    x = torch.randn(2, 5, 16)
    trained = layer(x)
    assert trained.requires_grad and layer._stacked is None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), trained.detach(), rtol=1e-6, atol=1e-6)
        layer.double()
        assert layer._stacked is None  # .to() drops the copy
        layer(x.double())
        assert layer._stacked is None  # float64: no grouped matmul on CPU


def test_stacked_copy_follows_weight_edits(monkeypatch) -> None:
    layer = _layer()
    x = torch.randn(4, 6, 16)
    with torch.no_grad():
        before = layer(x)
        key = layer._stacked.key
        for expert in layer.experts:  # in place, as an optimiser step or load_state_dict would
            expert.down.weight.mul_(2.0)
        after = layer(x)
        assert layer._stacked.key != key
        torch.testing.assert_close(after, _loop(layer, x, monkeypatch), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(after, before)


def test_hooked_expert_runs_as_a_module(monkeypatch) -> None:
    layer = _layer(top_k=4)  # every token reaches every expert
    x = torch.randn(2, 5, 16)
    calls = []
    handle = layer.experts[1].up.register_forward_hook(lambda module, args, output: calls.append(len(args[0])))
    try:
        with torch.no_grad():
            out = layer(x)
    finally:
        handle.remove()
    assert calls == [10] and layer._stacked is None
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), rtol=1e-6, atol=1e-6)  # unhooked: stacked, same output
    assert layer._stacked is not None
