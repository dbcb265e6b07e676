"""MoE layer and routing primitives: grouped execution vs a per-token reference, gates, losses, layout errors."""

from __future__ import annotations

import pytest
import torch

from compressdit.errors import ConfigError
from compressdit.moe.layers import MoEFeedForward, MoELayout
from compressdit.moe.routing import balance_loss, dispatch, load_fractions, top_k, z_loss

LAYOUT = dict(dim=16, dim_out=12, experts=4, expert_hidden=8, top_k=2, shared_hidden=8)


def _layer(**overrides) -> MoEFeedForward:
    torch.manual_seed(0)
    layer = MoEFeedForward(MoELayout.from_dict({**LAYOUT, **overrides}))
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    return layer.double()


def _per_token(layer: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """The MoE output token by token: the definition grouped execution must reproduce."""
    rows = []
    for token in x.reshape(-1, x.shape[-1]):
        gates, chosen = layer.route(token[None])
        y = sum(g * layer.experts[int(e)](token[None])[0] for g, e in zip(gates[0], chosen[0]))
        y = y + (layer.shared(token[None])[0] if layer.shared is not None else 0)
        y = y + (layer.bias if layer.bias is not None else 0)
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("gating", ["unit", "softmax"])
@pytest.mark.parametrize("shared", [0, 8])
def test_grouped_execution_matches_per_token_reference(gating: str, shared: int) -> None:
    layer = _layer(gating=gating, shared_hidden=shared)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (3, 5, 12)
    torch.testing.assert_close(out, _per_token(layer, x), rtol=1e-12, atol=1e-12)


def test_top_k_shapes_and_dispatch_order() -> None:
    logits = torch.randn(10, 4)
    probs, chosen = top_k(logits, 3)
    assert probs.shape == (10, 4) and chosen.shape == (10, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(10))
    plan = dispatch(chosen, torch.ones(10, 3), 4)
    assert sum(plan.counts) == 30 and len(plan.tokens) == len(plan.gates) == 4
    for e, tokens in enumerate(plan.tokens):  # each expert's tokens: those that chose it, ascending
        assert tokens.tolist() == [i for i in range(10) if e in chosen[i].tolist()]
    experts_sorted = chosen.reshape(-1)[torch.argsort(chosen.reshape(-1), stable=True)]
    assert torch.all(experts_sorted[1:] >= experts_sorted[:-1])
    assert plan.counts == torch.bincount(chosen.reshape(-1), minlength=4).tolist()


def test_unit_gates_are_one_and_train_the_router() -> None:
    layer = _layer(gating="unit")
    x = torch.randn(6, 16, dtype=torch.float64)
    gates, _ = layer.route(x)
    assert torch.equal(gates, torch.ones_like(gates))
    layer(x).square().sum().backward()
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shared", [0, 8])
def test_inference_skips_unit_gates_and_matches_the_training_path(shared: int) -> None:
    layer = _layer(gating="unit", shared_hidden=shared)
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    trained = layer(x)  # gates computed (gradient to the router)
    assert trained.requires_grad and layer._gates_needed()
    with torch.no_grad():
        assert not layer._gates_needed()
        assert torch.equal(layer(x), trained.detach())
    layer.requires_grad_(False)
    assert not layer._gates_needed() and torch.equal(layer(x), trained.detach())


def test_empty_experts_are_skipped() -> None:
    layer = _layer(top_k=1)
    with torch.no_grad():  # every token to expert 2
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    x = torch.randn(7, 16, dtype=torch.float64)
    expected = layer.experts[2](x) + layer.shared(x) + layer.bias
    torch.testing.assert_close(layer(x), expected)


def test_balance_loss_is_one_when_balanced_and_grows_with_imbalance() -> None:
    balanced = torch.eye(4).repeat(8, 1)  # each expert first for 8 tokens
    torch.testing.assert_close(load_fractions(top_k(balanced, 1)[1], 4), torch.full((4,), 0.25))
    skewed = torch.zeros(32, 4)
    skewed[:, 0] = 5.0
    assert balance_loss(balanced * 10, 1).item() == pytest.approx(1.0, abs=1e-3)
    assert balance_loss(skewed, 1).item() > 3.5
    assert z_loss(torch.zeros(5, 4)).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_parameters_per_token_counts_router_shared_and_k_experts() -> None:
    layout = MoELayout.from_dict(LAYOUT)
    layer = MoEFeedForward(layout)
    expert = sum(p.numel() for p in layer.experts[0].parameters())
    total = sum(p.numel() for p in layer.parameters())
    assert layout.parameters_per_token() == total - 2 * expert


@pytest.mark.parametrize("bad, message", [({"top_k": 5}, "exceeds"), ({"activation": "relu2"}, "activation"),
                                          ({"experts": 0}, "positive")])
def test_bad_layouts_are_one_line_errors(bad: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        MoELayout.from_dict({**LAYOUT, **bad})
    assert "\n" not in str(info.value)
