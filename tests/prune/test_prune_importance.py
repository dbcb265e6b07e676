"""Tests for compressdit.prune.importance on tiny random models of each family (2 sampling steps, CFG)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models import ADAPTERS
from compressdit.models.sampling import sample
from compressdit.prune.depth import remove_blocks, skip_blocks
from compressdit.prune.importance import BLOCK_IMPORTANCE, block_influence, keep_lowest_score, removal_error
from tests.prune.test_prune_depth import DOUBLE, FAMILIES, SINGLE, conditions, predict, sampling_adapter, tiny_model

torch.set_num_threads(1)

# layers that write a block's result into the residual streams; zeroed, the block is an exact identity
OUTPUT_LAYERS = ("attn.to_out.0", "attn1.to_out.0", "attn2.to_out.0", "attn.to_add_out", "ff.net.2",
                 "ff_context.net.2", "proj_out")
# one identity block per stack; DiT's block 0 is avoided because the output head reads its embedder
IDENTITY = {"dit": {(DOUBLE, 1)}, "pixart": {(DOUBLE, 0)}, "sd3": {(DOUBLE, 1)},
            "flux": {(DOUBLE, 1), (SINGLE, 0)}}


def _score(criterion, family: str, model: nn.Module) -> dict:
    adapter = sampling_adapter(family)
    return criterion(model, adapter, conditions(family), adapter.scheduler(model), steps=2, guidance=3.0, seed=1)


def _make_identity(model: nn.Module, adapter, blocks: set) -> None:
    with torch.no_grad():
        for stack, index, block in adapter.block_list(model):
            if (stack, index) in blocks:
                for name, module in block.named_modules():
                    if name in OUTPUT_LAYERS:
                        module.weight.zero_()
                        module.bias.zero_()


def test_criteria_are_registered() -> None:
    assert BLOCK_IMPORTANCE.get("block_influence") is block_influence
    assert BLOCK_IMPORTANCE.get("removal_error") is removal_error


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_blocks_score_zero_and_the_others_do_not(family: str) -> None:
    adapter, model = ADAPTERS.get(family), tiny_model(family)
    _make_identity(model, adapter, IDENTITY[family])
    blocks = [(stack, index) for stack, index, _ in adapter.block_list(model)]
    for criterion in (block_influence, removal_error):
        scores = _score(criterion, family, model)
        assert list(scores) == blocks
        assert all(math.isfinite(s) and s >= 0 for s in scores.values()), scores
        for key, score in scores.items():
            if key in IDENTITY[family]:
                assert score < 1e-9, (criterion.__name__, key, score)
            else:
                assert score > 1e-4, (criterion.__name__, key, score)
    assert all(not block._forward_hooks for _, _, block in adapter.block_list(model))


def test_removal_error_matches_a_skipped_sampling_run() -> None:
    adapter, model = sampling_adapter("dit"), tiny_model("dit")
    scheduler = adapter.scheduler(model)
    scores = _score(removal_error, "dit", model)
    full = sample(adapter, model, conditions("dit"), scheduler, steps=2, guidance=3.0, seed=1)
    with skip_blocks(model, adapter, {(DOUBLE, 2)}):
        skipped = sample(adapter, model, conditions("dit"), scheduler, steps=2, guidance=3.0, seed=1)
    expected = float((skipped.double() - full.double()).norm() / full.double().norm())
    assert scores[(DOUBLE, 2)] == pytest.approx(expected, rel=1e-9)


def test_lowest_scoring_identity_block_is_the_one_removed() -> None:
    adapter, model = ADAPTERS.get("dit"), tiny_model("dit")
    _make_identity(model, adapter, IDENTITY["dit"])
    keep = keep_lowest_score(_score(block_influence, "dit", model), adapter, model, ratio=1 / 3)
    assert keep == {DOUBLE: [0, 2]}
    full = predict("dit", model)
    assert torch.equal(predict("dit", remove_blocks(model, adapter, keep)), full)


def _scores(values: dict[str, list[float]]) -> dict:
    return {(stack, i): v for stack, scores in values.items() for i, v in enumerate(scores)}


def test_keep_lowest_score_rounds_per_stack() -> None:
    adapter, model = ADAPTERS.get("flux"), tiny_model("flux")
    scores = _scores({DOUBLE: [0.5, 0.1], SINGLE: [0.3, 0.2, 0.9]})
    # ratio 0.5: 2 double blocks drop 1, 3 single blocks drop floor(1.5 + 0.5) = 2
    assert keep_lowest_score(scores, adapter, model, 0.5) == {DOUBLE: [0], SINGLE: [2]}
    assert keep_lowest_score(scores, adapter, model, 0.2) == {DOUBLE: [0, 1], SINGLE: [0, 2]}
    assert keep_lowest_score(scores, adapter, model, 0.0) == {DOUBLE: [0, 1], SINGLE: [0, 1, 2]}
    # never the last block of a stack: 0.9 of 2 rounds to 2, one stays
    assert keep_lowest_score(scores, adapter, model, 0.9) == {DOUBLE: [0], SINGLE: [2]}


def test_keep_lowest_score_never_drops_a_keep_last_block_and_breaks_ties_by_index() -> None:
    adapter, model = ADAPTERS.get("sd3"), tiny_model("sd3")
    assert keep_lowest_score(_scores({DOUBLE: [0.4, 0.2, 0.0]}), adapter, model, 0.4) == {DOUBLE: [0, 2]}
    assert keep_lowest_score(_scores({DOUBLE: [0.1, 0.1, 0.0]}), adapter, model, 0.4) == {DOUBLE: [1, 2]}
    assert keep_lowest_score(_scores({DOUBLE: [0.1, 0.1, 0.0]}), adapter, model, 0.9) == {DOUBLE: [2]}


@pytest.mark.parametrize("scores, ratio, message", [
    ({(DOUBLE, 0): 1.0, (DOUBLE, 1): 1.0, (DOUBLE, 2): 1.0}, 1.0, r"ratio must be in \[0, 1\)"),
    ({(DOUBLE, 0): 1.0, (DOUBLE, 1): 1.0, (DOUBLE, 2): 1.0}, -0.1, "ratio"),
    ({(DOUBLE, 0): 1.0, (DOUBLE, 1): 1.0}, 0.5, r"missing \[\('transformer_blocks', 2\)\]"),
    ({(DOUBLE, 0): 1.0, (DOUBLE, 1): 1.0, (DOUBLE, 2): 1.0, (SINGLE, 0): 1.0}, 0.5, "unknown.*single"),
])
def test_keep_lowest_score_rejects_bad_input(scores: dict, ratio: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        keep_lowest_score(scores, ADAPTERS.get("dit"), tiny_model("dit"), ratio)
