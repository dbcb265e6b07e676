"""Layer-input Hessians captured by self-removing hooks (compressdit.calibration.hessian)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressdit.calibration.hessian import capture_input_hessians, hessian_chunks
from compressdit.errors import CalibrationError


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) for m in model.modules())


def test_hessian_is_twice_the_mean_outer_product_over_every_call():
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    calls = [torch.randn(4, 6, generator=gen), torch.randn(2, 3, 6, generator=gen)]  # 2-d and 3-d inputs
    with capture_input_hessians(model, ["0", "2"]) as recorder:
        for x in calls:
            model(x)
    assert _hooks(model) == 0
    rows = torch.cat([x.reshape(-1, 6) for x in calls])
    torch.testing.assert_close(recorder.pop("0"), 2 * rows.T @ rows / len(rows))
    hidden = torch.nn.functional.gelu(model[0](rows))
    torch.testing.assert_close(recorder.pop("2"), 2 * hidden.T @ hidden / len(rows))
    with pytest.raises(CalibrationError, match="saw no input"):  # popped: released
        recorder.pop("0")


def test_hooks_are_removed_after_an_error_and_non_finite_inputs_fail():
    model = _mlp()
    with pytest.raises(CalibrationError, match="non-finite activation .* entering 0"):
        with capture_input_hessians(model, ["0"]):
            model(torch.full((2, 6), float("nan")))
    assert _hooks(model) == 0


def test_chunks_keep_each_run_within_the_budget_in_order():
    widths = {"a": 16, "b": 16, "c": 32, "d": 8, "e": 64}
    chunks = hessian_chunks(widths, budget_bytes=4 * 32 * 32)
    assert chunks == [["a", "b"], ["c"], ["d"], ["e"]]  # "e" alone is over the budget: a chunk of its own
    assert hessian_chunks(widths, budget_bytes=1 << 30) == [list(widths)]
