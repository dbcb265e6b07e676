"""Tests for compressdit.distill.trainer: config, learning, exact resume, time cap, data, two processes."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compressdit.distill import DistillConfig, DistillData, distill
from compressdit.distill.data import BatchSampler
from compressdit.distill.objectives import EpsilonObjective
from compressdit.errors import ConfigError, UnsupportedModelError
from compressdit.models import ADAPTERS
from compressdit.models.text_conditions import synthetic_text
from compressdit.prune.depth import remove_blocks
from tests.conftest import tiny_dit, tiny_pixart

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
DIT = ADAPTERS.get("dit")


def make_pair():
    """A 3-block tiny DiT teacher and a student made by deleting its middle block."""
    teacher = tiny_dit(layers=3)
    return teacher, remove_blocks(copy.deepcopy(teacher), DIT, {"transformer_blocks": [0, 2]})


def synthetic_data(count: int = 32) -> DistillData:
    gen = torch.Generator().manual_seed(1)
    classes = list(range(10))
    return DistillData(torch.randn(count, 4, 8, 8, generator=gen), torch.randint(0, 10, (count,), generator=gen),
                       classes, classes, DIT.null_conditions(1)[0])


def tiny_config(**overrides) -> DistillConfig:
    base = {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup": 1, "checkpoint_every": 2, "ema_decay": 0.9}
    return DistillConfig.from_dict({**base, **overrides})


@torch.no_grad()
def _output_gap(student, teacher) -> float:
    gen = torch.Generator().manual_seed(7)
    x, t = torch.randn(16, 4, 8, 8, generator=gen), torch.randint(0, 1000, (16,), generator=gen)
    cond = DIT.encode(student, torch.randint(0, 10, (16,), generator=gen).tolist())
    return torch.nn.functional.mse_loss(DIT.predict(student, x, t, cond), DIT.predict(teacher, x, t, cond)).item()


def test_config_is_strict_and_checked():
    assert DistillConfig.from_dict({"layer_map": [1, 3]}).layer_map == [1, 3]
    assert DistillConfig.from_dict({"layer_map": [[0, 1]]}).layer_map == [[0, 1]]
    for data, needle in [({"stepz": 3}, "unknown key 'stepz'"), ({"steps": 0}, "steps: must be positive"),
                         ({"layer_map": "nearest"}, "layer_map"), ({"ema_decay": 1.0}, "ema_decay"),
                         ({"output_weight": 0, "feature_weight": 0, "data_weight": 0}, "nothing to train"),
                         ({"feature_schedule": "cosine"}, "feature_schedule")]:
        with pytest.raises(ConfigError, match=needle):
            DistillConfig.from_dict(data)


def test_student_gets_closer_to_teacher(tmp_path):
    teacher, student = make_pair()
    before = _output_gap(student, teacher)
    config = tiny_config(steps=4, batch_size=8, lr=5e-4, output_weight=1.0, data_weight=0.0, feature_weight=0.05,
                         ema_decay=None, warmup=0)
    metrics = distill(student, teacher, DIT, config, tmp_path, synthetic_data(), origin=[0, 2], quiet=True)
    after = _output_gap(student, teacher)
    assert metrics["completed"] and metrics["steps"] == 4 and metrics["layer_map"] == [[0, 0], [1, 2]]
    assert after < 0.9 * before, (before, after)  # 1.00 -> 0.86 here
    assert [h["feature_weight"] for h in metrics["history"]] == pytest.approx([0.05, 0.0375, 0.025, 0.0125])
    assert not any(p.requires_grad for p in teacher.parameters()) and not student.training


def _run(workdir, stop_at=None, config=None):
    teacher, student = make_pair()
    metrics = distill(student, teacher, DIT, config or tiny_config(), workdir, synthetic_data(), origin=[0, 2],
                      quiet=True, stop_at=stop_at)
    return student, metrics


def test_resume_is_bit_exact(tmp_path):
    straight, full = _run(tmp_path / "straight")
    _, first = _run(tmp_path / "resumed", stop_at=2)
    assert not first["completed"] and first["steps"] == 2
    assert torch.load(tmp_path / "resumed" / "state.pt", weights_only=False)["step"] == 2
    resumed, second = _run(tmp_path / "resumed")  # a fresh process would start from the same files
    assert second["completed"] and second["steps"] == 4
    assert second["history"] == full["history"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    again, third = _run(tmp_path / "resumed")  # a finished run only reloads its result
    assert third["steps"] == 4 and all(torch.equal(a, b) for a, b in
                                       zip(again.state_dict().values(), straight.state_dict().values()))


def test_time_cap_stops_with_state_saved(tmp_path):
    _, capped = _run(tmp_path, config=tiny_config(max_minutes=0.0))
    assert not capped["completed"] and capped["steps"] == 1
    assert torch.load(tmp_path / "state.pt", weights_only=False)["step"] == 1
    _, done = _run(tmp_path)
    assert done["completed"] and len(done["history"]) == 4


def test_family_and_batch_checks(tmp_path):
    teacher, student = make_pair()
    with pytest.raises(UnsupportedModelError, match="one model family"):
        distill(tiny_pixart(), teacher, DIT, tiny_config(), tmp_path, synthetic_data())
    with pytest.raises(ConfigError, match="cannot be mapped"):
        distill(teacher, student, DIT, tiny_config(), tmp_path, synthetic_data())


def test_batches_drop_conditions_and_pick_captions_per_class():
    texts = synthetic_text(4, 3, 8)
    data = DistillData(torch.zeros(64, 4, 8, 8), torch.arange(64) % 2, texts, [0, 0, 1, 1], texts[0])
    sampler = BatchSampler(data, EpsilonObjective(), dropout=0.25)
    rows = torch.cat([sampler.draw(64, torch.Generator().manual_seed(s)).condition_rows for s in range(8)])
    assert set(rows.tolist()) == {0, 1, 2, 3, 4}  # every caption and the null row (4)
    assert 0.15 < (rows == 4).float().mean() < 0.35
    batch = sampler.draw(8, torch.Generator().manual_seed(0))
    labels_of_rows = {0: 0, 1: 0, 2: 1, 3: 1}
    idx = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(0))
    kept = batch.condition_rows != 4
    assert all(labels_of_rows[int(r)] == int(data.labels[i]) for r, i in zip(batch.condition_rows[kept], idx[kept]))
    half = batch.part(1, 2)
    assert torch.equal(half.x_t, batch.x_t[4:]) and torch.equal(half.condition_rows, batch.condition_rows[4:])
    with pytest.raises(ConfigError, match="class 1"):
        DistillData(torch.zeros(2, 4, 8, 8), torch.tensor([0, 1]), [0], [0], 1000)


def _tiny_flux():
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=40,
                                  axes_dims_rope=(4, 6, 6)).eval()


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_text_and_flow_families(family, tmp_path):
    """Caption embeddings as conditions; Flux: flow objective, two block stacks, joint block outputs."""
    teacher = tiny_pixart(layers=2, caption_channels=48) if family == "pixart" else _tiny_flux()
    adapter = ADAPTERS.get(family)
    keep = {"transformer_blocks": [1]} if family == "pixart" else {"transformer_blocks": [1],
                                                                    "single_transformer_blocks": [0]}
    student = remove_blocks(copy.deepcopy(teacher), adapter, keep)
    texts = synthetic_text(5, 3, 48, 40 if family == "flux" else None)
    data = DistillData(torch.randn(8, 4, 8, 8), torch.arange(8) % 4, texts[:4], [0, 1, 2, 3], texts[4])
    metrics = distill(student, teacher, adapter, tiny_config(steps=2, feature_schedule="constant"), tmp_path, data,
                      origin=keep if family == "flux" else keep["transformer_blocks"], quiet=True)
    assert metrics["completed"] and metrics["layer_map"] == ([[0, 1]] if family == "pixart" else [[0, 1], [1, 2]])
    assert all(h["feature"] > 0 and h["output"] > 0 for h in metrics["history"])


def test_two_processes_end_with_identical_weights(tmp_path):
    """torchrun, 2 CPU processes, gloo: both ranks hold the same weights and log the single-process losses."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "distill" / "two_process_worker.py"), str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["processes"] == ranks[1]["processes"] == 2 and ranks[0]["steps"] == 2
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["history"] == ranks[1]["history"]
    # each process takes half of the same global batch: the first (pre-update) loss equals one process's
    _, single = _run(tmp_path / "single", config=tiny_config(steps=2))
    for key, value in single["history"][0].items():
        assert ranks[0]["history"][0][key] == pytest.approx(value, rel=1e-5), key
