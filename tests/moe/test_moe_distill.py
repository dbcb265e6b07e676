"""Distilling a Dense2MoE student from its dense teacher: router losses, expert load, learning, exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

from compressdit.distill import DistillConfig, distill
from compressdit.moe.dense2moe import Dense2MoEConfig, dense2moe
from tests.distill.test_distill_trainer import DIT, synthetic_data
from tests.moe.test_dense2moe import _batches
from tests.conftest import tiny_dit

CONFIG = {"steps": 4, "batch_size": 8, "lr": 3e-4, "warmup": 0, "checkpoint_every": 2, "ema_decay": None,
          "output_weight": 1.0, "data_weight": 0.0, "feature_weight": 0.05, "balance_weight": 0.01,
          "router_z_weight": 0.001}


def _pair():
    teacher = tiny_dit(layers=2)
    student = copy.deepcopy(teacher)
    dense2moe(student, DIT, Dense2MoEConfig.from_dict({"experts": 7, "shared_experts": 1, "top_k": 2}),
              _batches(teacher))
    return teacher, student


@torch.no_grad()
def _output_gap(student, teacher) -> float:
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(16, 4, 8, 8, generator=gen), torch.randint(0, 1000, (16,), generator=gen)
    cond = DIT.encode(student, torch.randint(0, 10, (16,), generator=gen).tolist())
    return torch.nn.functional.mse_loss(DIT.predict(student, x, t, cond), DIT.predict(teacher, x, t, cond)).item()


def _run(workdir, stop_at=None):
    teacher, student = _pair()
    metrics = distill(student, teacher, DIT, DistillConfig.from_dict(CONFIG), workdir, synthetic_data(),
                      quiet=True, stop_at=stop_at)
    return teacher, student, metrics


def test_short_distillation_lowers_the_loss_with_router_losses(tmp_path):
    teacher, student = _pair()
    before = _output_gap(student, teacher)
    metrics = distill(student, teacher, DIT, DistillConfig.from_dict({**CONFIG, "steps": 6}), tmp_path,
                      synthetic_data(), quiet=True)
    after = _output_gap(student, teacher)
    assert after < 0.9 * before, (before, after)  # 0.246 -> 0.181 here
    history = metrics["history"]
    assert all(h["balance"] >= 0.99 and h["router_z"] > 0 for h in history)  # E * sum f P >= 1 (Cauchy-Schwarz)
    load = metrics["expert_load"]
    assert load["experts"] == 7 and len(load["busiest_share_per_bin"]) == 10 and 0 < load["router_entropy"]
    assert all(1 / 7 - 1e-6 <= s <= 1 for s in load["busiest_share_per_bin"] if s)


def test_dense_student_has_no_router_losses(tmp_path):
    teacher = tiny_dit(layers=2)
    metrics = distill(copy.deepcopy(teacher), teacher, DIT, DistillConfig.from_dict({**CONFIG, "steps": 1}),
                      tmp_path, synthetic_data(), quiet=True)
    assert "balance" not in metrics["history"][0] and metrics["expert_load"] == {}


def test_moe_distillation_resumes_bit_exactly(tmp_path):
    _, straight, full = _run(tmp_path / "straight")
    _, _, first = _run(tmp_path / "resumed", stop_at=2)
    assert not first["completed"] and first["steps"] == 2
    _, resumed, second = _run(tmp_path / "resumed")
    assert second["completed"] and second["history"] == full["history"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("key", ["balance_weight", "router_z_weight"])
def test_negative_router_weights_are_rejected(key):
    from compressdit.errors import ConfigError

    with pytest.raises(ConfigError, match=key):
        DistillConfig.from_dict({key: -1.0})


def test_run_key_tells_top_k_apart():
    """dense2moe-50 and -62 split the same tensors (only top_k differs): their distillations must not share a
    workdir (one resumed the other's finished state before the layouts joined the key)."""
    from compressdit.moe.layers import moe_layers
    from compressdit.stages.distill import DistillStageConfig, run_key

    teacher, student = _pair()
    config = DistillStageConfig.from_dict({"steps": 1, "batch_size": 8})
    other = copy.deepcopy(student)
    for layer in moe_layers(other).values():
        layer.layout = type(layer.layout).from_dict({**layer.layout.to_dict(), "top_k": 3})
        layer.top_k = 3
    assert run_key(student, teacher, config) == run_key(copy.deepcopy(student), teacher, config)
    assert run_key(student, teacher, config) != run_key(other, teacher, config)
    assert run_key(teacher, teacher, config) == run_key(copy.deepcopy(teacher), teacher, config)
