"""bench/lowbit_verdicts.py: storage accounting of quantized layers and the issue-14 bar verdicts."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "lowbit_verdicts.py"
_spec = importlib.util.spec_from_file_location("lowbit_verdicts", _PATH)
lv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lv)

MODELS = ["a", "b"]


def _row(model, recipe, acc, psnr=None, fd_real=10.0, fd_ref=None, bits=4.5, total_s=1.0):
    return {"model": model, "recipe": recipe, "status": "ok", "time": {"total_s": total_s},
            "metrics": {"acc": acc, "psnr": psnr, "fd_real": fd_real, "fd_ref": fd_ref},
            "storage": {"quantized": {"bits_per_weight": bits}}}


def _rows(*rows):
    return {(r["model"], r["recipe"]): r for r in rows}


def test_storage_bits_counts_scales_and_branches_but_not_bias():
    # int4 g64 layer of 128 x 64: 4096 packed bytes + 2 x 64 fp32 scales; a low-rank branch on the other layer
    layers = {"blocks.0.attn.to_q": 128 * 64, "blocks.0.ff.net.0.proj": 64 * 64}
    stored = {"blocks.0.attn.to_q.weight": 4096, "blocks.0.attn.to_q.weight_scale": 512,
              "blocks.0.attn.to_q.bias": 256, "blocks.0.ff.net.0.proj.weight": 2048,
              "blocks.0.ff.net.0.proj.low_rank_up": 1024, "blocks.0.norm.weight": 999}
    out = lv.storage_bits(stored, layers)
    assert out["weights"] == 128 * 64 + 64 * 64
    assert out["bytes"] == 4096 + 512 + 2048 + 1024
    assert out["bits_per_weight"] == pytest.approx(8 * (4096 + 512 + 2048 + 1024) / (128 * 64 + 64 * 64))


def test_storage_bits_gives_a_tensor_to_the_longest_layer_prefix():
    layers = {"proj": 16, "proj.inner": 16}
    out = lv.storage_bits({"proj.inner.weight": 8, "proj.weight": 4}, layers)
    assert out["bytes"] == 12 and out["bits_per_weight"] == pytest.approx(8 * 12 / 32)


def test_w4_bar_needs_three_db_accuracy_and_bits_on_every_model():
    rows = _rows(_row("a", lv.FULL, 0.90), _row("a", "rtn-w4a8", 0.89, psnr=27.0),
                 _row("a", "gptq-w4a8", 0.885, psnr=30.5),
                 _row("b", lv.FULL, 0.95), _row("b", "rtn-w4a8", 0.94, psnr=30.0),
                 _row("b", "gptq-w4a8", 0.95, psnr=32.9))
    out = lv.w4_bar(rows, MODELS, "gptq-w4a8", "rtn-w4a8")
    assert out["models"]["a"]["pass"] and out["models"]["a"]["psnr_gain_db"] == 3.5
    assert not out["models"]["b"]["pass"]  # 2.9 dB
    assert out["pass"] is False
    rows[("a", "gptq-w4a8")]["storage"]["quantized"]["bits_per_weight"] = 4.75
    assert not lv.w4_bar(rows, ["a"], "gptq-w4a8", "rtn-w4a8")["pass"]
    rows[("a", "gptq-w4a8")]["storage"]["quantized"]["bits_per_weight"] = 4.5
    rows[("a", "gptq-w4a8")]["metrics"]["acc"] = 0.875  # 2.5 points below full precision
    assert not lv.w4_bar(rows, ["a"], "gptq-w4a8", "rtn-w4a8")["pass"]


def test_w4a4_bar_ratio_and_incomplete_rows():
    rows = _rows(_row("a", lv.FULL, 0.90, fd_real=10.0), _row("a", "lrq-w4a4", 0.86, fd_real=12.4),
                 _row("b", lv.FULL, 0.90, fd_real=10.0))
    out = lv.w4a4_bar(rows, MODELS, "lrq-w4a4")
    assert out["models"]["a"] == {"fd_real_ratio": 1.24, "acc_drop_points": 4.0, "pass": True}
    assert out["models"]["b"] is None and out["pass"] is None  # missing row: not a verdict yet
    rows[("b", "lrq-w4a4")] = _row("b", "lrq-w4a4", 0.90, fd_real=12.6)
    assert lv.w4a4_bar(rows, MODELS, "lrq-w4a4")["pass"] is False
    rows[("b", "lrq-w4a4")]["status"] = "error"
    assert lv.w4a4_bar(rows, MODELS, "lrq-w4a4")["pass"] is None


def test_fp_bar_head_to_head_and_time():
    rows = _rows(_row("a", "fp4-w4a8", 0.9, psnr=29.0, fd_ref=3.0, total_s=1300.0),
                 _row("a", "rtn-w4a8", 0.9, psnr=28.0, fd_ref=5.0))
    assert lv.lower_fd_bar(rows, ["a"], "fp4-w4a8", "rtn-w4a8")["pass"] is True
    duel = lv.head_to_head(rows, ["a"], "fp4-w4a8", "rtn-w4a8")["a"]
    assert duel["winner"] == "fp4-w4a8" and duel["fd_ref_ratio_loser_to_winner"] == pytest.approx(1.67)
    timing = lv.time_bar(rows)
    assert timing["pass"] is False and timing["over"] == ["a/fp4-w4a8"] and timing["over_in_cpu_s"] == []
    rows[("a", "fp4-w4a8")]["time"]["cpu_s"] = 1250.0
    assert lv.time_bar(rows)["over_in_cpu_s"] == ["a/fp4-w4a8"]
