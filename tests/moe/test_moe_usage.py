"""Routing capture (hooks removed on exit), router losses over captured forwards, expert load per timestep."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdit.moe.layers import MoEFeedForward, MoELayout, activated_parameters
from compressdit.moe.usage import ExpertLoad, capture_routing, router_losses


def _model() -> nn.Module:
    torch.manual_seed(0)
    layout = MoELayout(dim=8, dim_out=8, experts=4, expert_hidden=4, top_k=2, shared_hidden=4)
    return nn.Sequential(MoEFeedForward(layout), MoEFeedForward(layout))


def test_capture_records_each_layer_and_removes_its_hooks() -> None:
    model = _model()
    x = torch.randn(3, 5, 8)
    with capture_routing(model) as records:
        model(x)
    assert [r.layer for r in records] == ["0", "1"] and records[0].logits.shape == (15, 4)
    model(x)
    assert len(records) == 2 and not model[0].router._forward_hooks
    losses = router_losses(records)
    assert set(losses) == {"balance", "router_z"} and losses["balance"].item() >= 1 - 1e-6
    assert router_losses([]) == {}


def test_expert_load_counts_per_timestep_bin() -> None:
    model = _model()
    load = ExpertLoad()
    with capture_routing(model) as records:
        model(torch.randn(3, 5, 8))
        load.add(records, torch.tensor([50, 950, 955]))
    fractions = load.fractions()
    assert len(fractions["0"]) == 10 and len(fractions["0"][0]) == 4
    shares = torch.tensor(fractions["0"])
    assert shares[0].sum().item() == pytest.approx(1.0) and shares[9].sum().item() == pytest.approx(1.0)
    assert shares[1:9].sum().item() == 0
    counts = load.counts["0"]
    assert counts[0].sum().item() == 5 * 2 and counts[9].sum().item() == 2 * 5 * 2  # tokens x top_k
    summary = load.summary()
    assert summary["experts"] == 4 and 0 < summary["router_entropy"] <= torch.log(torch.tensor(4.0)).item()


def test_activated_parameters_leave_out_the_skipped_experts() -> None:
    model = _model()
    expert = sum(p.numel() for p in model[0].experts[0].parameters())
    assert activated_parameters(model) == sum(p.numel() for p in model.parameters()) - 2 * 2 * expert
