"""Tests for compressdit.prune.tinyfusion: groups, keep-patterns, gates, Gumbel draws, LoRA and a short search."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from compressdit.distill.data import DistillData
from compressdit.errors import ConfigError
from compressdit.models import ADAPTERS
from compressdit.prune.depth import remove_blocks
from compressdit.prune.mask_estimators import MASK_ESTIMATORS, draw_masks
from compressdit.prune.tinyfusion import (GatedBlock, Group, LoRALinear, TinyFusionConfig, gated_blocks,
                                          keep_patterns, lora_linears, make_groups, parse_pattern, temperature,
                                          tinyfusion_search)
from tests.prune.test_prune_depth import DOUBLE, SINGLE, predict, tiny_model
from tests.conftest import tiny_dit
from tests.prune.test_prune_importance import _make_identity

torch.set_num_threads(1)
DIT, FLUX, SD3 = ADAPTERS.get("dit"), ADAPTERS.get("flux"), ADAPTERS.get("sd3")


def _stacks(**counts: int) -> SimpleNamespace:
    """A stand-in model: only the lengths of its block lists matter to ``make_groups``."""
    return SimpleNamespace(**{name: [None] * count for name, count in counts.items()})


# patterns and groups ---------------------------------------------------------------------------------------


def test_parse_pattern() -> None:
    assert parse_pattern("1:2") == (1, 2) and parse_pattern(" 2:4 ") == (2, 4) and parse_pattern("7:14") == (7, 14)
    for bad, message in [("2:2", "fewer than all"), ("0:4", "at least one"), ("half", "expected 'N:M'"),
                         ("10:40", "keep-patterns per group")]:
        with pytest.raises(ConfigError, match=message):
            parse_pattern(bad)


@pytest.mark.parametrize("keep, size, count", [(1, 2, 2), (2, 4, 6), (1, 4, 4), (3, 4, 4), (7, 14, 3432)])
def test_keep_patterns_enumerate_every_choice_once(keep: int, size: int, count: int) -> None:
    table = keep_patterns(keep, size)
    assert table.shape == (count, size)
    assert torch.all(table.sum(1) == keep)
    assert len({tuple(row) for row in table.tolist()}) == count
    if (keep, size) == (1, 2):
        assert table.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_groups_never_straddle_stacks() -> None:
    model = _stacks(transformer_blocks=5, single_transformer_blocks=8)
    groups = make_groups(model, FLUX, 2, 4)
    assert groups == [Group(DOUBLE, (0, 1, 2, 3), 2), Group(DOUBLE, (4,), 1),  # 1 block left: keeps round(0.5)
                      Group(SINGLE, (0, 1, 2, 3), 2), Group(SINGLE, (4, 5, 6, 7), 2)]
    assert make_groups(_stacks(transformer_blocks=6), DIT, 1, 2) == [
        Group(DOUBLE, (0, 1), 1), Group(DOUBLE, (2, 3), 1), Group(DOUBLE, (4, 5), 1)]
    # a keep_last block is in no group; a lone remainder keeping nothing is still a group (always dropped)
    assert make_groups(_stacks(transformer_blocks=6), SD3, 1, 4) == [Group(DOUBLE, (0, 1, 2, 3), 1),
                                                                      Group(DOUBLE, (4,), 0)]
    assert make_groups(_stacks(transformer_blocks=2), DIT, 1, 4) == [Group(DOUBLE, (0, 1), 1)]  # keeps >= 1


def test_temperature_falls_linearly() -> None:
    assert temperature(0, 300, 4.0, 0.1) == 4.0
    assert temperature(299, 300, 4.0, 0.1) == pytest.approx(0.1)
    assert temperature(100, 201, 4.0, 0.0) == pytest.approx(2.0)
    assert temperature(0, 1, 4.0, 0.1) == 4.0


# gated residual blocks -------------------------------------------------------------------------------------


def _gated_predict(family: str, model: nn.Module, masks: dict) -> torch.Tensor:
    gates: dict = {}
    with gated_blocks(model, ADAPTERS.get(family), masks, gates):
        gates.update(masks)
        return predict(family, model)


@pytest.mark.parametrize("family, dropped", [("dit", {(DOUBLE, 0)}), ("dit", {(DOUBLE, 1), (DOUBLE, 2)}),
                                             ("flux", {(DOUBLE, 0), (SINGLE, 1)})])
def test_gates_at_one_are_the_model_and_at_zero_its_removal(family: str, dropped: set) -> None:
    adapter, model = ADAPTERS.get(family), tiny_model(family)
    blocks = [(stack, index) for stack, index, _ in adapter.block_list(model)]
    full = predict(family, model)
    keep = {s.attribute: [i for i in range(len(getattr(model, s.attribute))) if (s.attribute, i) not in dropped]
            for s in adapter.block_stacks}
    removed = predict(family, remove_blocks(tiny_model(family), adapter, keep))
    assert torch.equal(_gated_predict(family, model, {key: torch.ones(2) for key in blocks}), full)
    off = {key: torch.zeros(2) if key in dropped else torch.ones(2) for key in blocks}
    assert torch.allclose(_gated_predict(family, model, off), removed, atol=1e-6, rtol=0)  # DiT: head embedder too
    per_sample = {key: torch.tensor([1.0, 0.0]) if key in dropped else torch.ones(2) for key in blocks}
    mixed = _gated_predict(family, model, per_sample)
    assert torch.allclose(mixed[0], full[0], atol=1e-6, rtol=0) and torch.allclose(mixed[1], removed[1], atol=1e-6,
                                                                                      rtol=0)
    assert all(type(b) is not GatedBlock for _, _, b in adapter.block_list(model))  # put back
    assert torch.equal(predict(family, model), full)


@pytest.mark.parametrize("stack_name", [DOUBLE, SINGLE])
def test_gate_acts_on_both_streams_of_a_flux_block(stack_name: str) -> None:
    model = tiny_model("flux")
    stack, block = FLUX.block_stack(stack_name), getattr(model, stack_name)[0]
    hidden, text, temb = torch.randn(2, 4, 32), torch.randn(2, 3, 32), torch.randn(2, 32)
    masks: dict = {}
    gated = GatedBlock(block, stack, (stack_name, 0), masks)
    with torch.no_grad():
        out_text, out_hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
        for m, expected in [(1.0, (out_text, out_hidden)), (0.0, (text, hidden))]:
            masks[(stack_name, 0)] = torch.full((2,), m)
            got = gated(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
            assert all(torch.equal(g, e) for g, e in zip(got, expected))
        masks[(stack_name, 0)] = torch.tensor([0.0, 1.0])
        got_text, got_hidden = gated(hidden_states=hidden, encoder_hidden_states=text, temb=temb)
    assert torch.equal(got_text[0], text[0]) and torch.equal(got_hidden[0], hidden[0])
    assert torch.equal(got_text[1], out_text[1]) and torch.equal(got_hidden[1], out_hidden[1])


def test_gumbel_draws_are_hard_per_sample_and_differentiable() -> None:
    torch.manual_seed(0)
    groups = [Group(DOUBLE, (0, 1), 1), Group(DOUBLE, (2, 3, 4, 5), 2)]
    patterns = [keep_patterns(1, 2), keep_patterns(2, 4)]
    logits = [nn.Parameter(torch.full((2,), 0.02)), nn.Parameter(torch.full((6,), 0.02))]
    masks = draw_masks(groups, patterns, logits, scaling=100.0, tau=1.0, batch=64)
    assert sorted(masks) == [(DOUBLE, i) for i in range(6)]
    stacked = torch.stack([masks[(DOUBLE, i)] for i in range(6)], 1)  # [batch, blocks]
    assert set(stacked.unique().tolist()) == {0.0, 1.0}
    assert torch.all(stacked[:, :2].sum(1) == 1) and torch.all(stacked[:, 2:].sum(1) == 2)
    assert len({tuple(row) for row in stacked.tolist()}) > 4  # samples draw their own patterns
    (stacked * torch.randn(6)).sum().backward()
    assert all(logit.grad is not None and logit.grad.abs().sum() > 0 for logit in logits)


def test_score_function_draws_are_hard_and_its_gradient_prefers_the_cheaper_pattern() -> None:
    torch.manual_seed(0)
    groups = [Group(DOUBLE, (0, 1), 1), Group(DOUBLE, (2, 3, 4, 5), 2)]
    patterns = [keep_patterns(1, 2), keep_patterns(2, 4)]
    logits = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(6))]
    draws, samples = 4, 64
    draw = MASK_ESTIMATORS.get("score_function")().draw(groups, patterns, logits, 1.0, 1.0, draws * samples)
    stacked = torch.stack([draw.masks[(DOUBLE, i)] for i in range(6)], 1)
    assert set(stacked.unique().tolist()) == {0.0, 1.0}
    assert torch.all(stacked[:, :2].sum(1) == 1) and torch.all(stacked[:, 2:].sum(1) == 2)
    # dropping block 0 costs 1, dropping block 3 costs 0.5, the rest nothing; per-sample scales differ 100x
    scale = torch.logspace(-1, 1, samples)
    losses = ((1 - stacked[:, 0]) + 0.5 * (1 - stacked[:, 3])).view(draws, samples) * scale + 0.1 * scale
    draw.objective(losses).backward()
    assert logits[0].grad[0] < 0 < logits[0].grad[1]  # descent raises the logit of keeping block 0
    kept_3 = patterns[1][:, 1].bool()  # patterns of the 4-group that keep block 3
    assert logits[1].grad[kept_3].sum() < 0 < logits[1].grad[~kept_3].sum()
    with pytest.raises(ValueError, match="at least 2 draws"):
        draw.objective(losses[:1])


def test_plackett_luce_keeps_n_blocks_learns_per_block_and_decides_the_top_n() -> None:
    torch.manual_seed(0)
    estimator = MASK_ESTIMATORS.get("plackett_luce")()
    groups = [Group(DOUBLE, (0, 1), 1), Group(DOUBLE, tuple(range(2, 8)), 3)]
    patterns = [keep_patterns(1, 2), keep_patterns(3, 6)]
    assert [estimator.logit_count(t) for t in patterns] == [2, 6]  # one per block, not C(6, 3) = 20
    logits = [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(6))]
    draws, samples = 4, 128
    draw = estimator.draw(groups, patterns, logits, 1.0, 1.0, draws * samples)
    stacked = torch.stack([draw.masks[(DOUBLE, i)] for i in range(8)], 1)
    assert set(stacked.unique().tolist()) == {0.0, 1.0}
    assert torch.all(stacked[:, :2].sum(1) == 1) and torch.all(stacked[:, 2:].sum(1) == 3)
    losses = ((1 - stacked[:, 0]) + 0.5 * (1 - stacked[:, 4])).view(draws, samples) + 0.1
    draw.objective(losses).backward()
    assert logits[0].grad[0] < 0 < logits[0].grad[1]
    assert logits[1].grad[2] == logits[1].grad.min() < 0  # block 4 is the 3rd of the second group

    # 1 of 2 is a softmax over the two blocks; the decision is the top-N blocks
    table, logit = patterns[0], torch.tensor([0.3, -0.2])
    probability = estimator.pattern_probabilities(table, logit, scaling=2.0)
    assert torch.allclose(probability, torch.softmax(logit * 2.0, 0), atol=0.02)
    logit = torch.tensor([0.1, 2.0, -1.0, 1.5, 0.0, 0.9])
    probability = estimator.pattern_probabilities(patterns[1], logit, scaling=1.0)
    assert probability.sum() == pytest.approx(1.0) and len(probability) == 20
    chosen = estimator.decide(patterns[1], logit)
    assert patterns[1][chosen].tolist() == [0, 1, 0, 1, 0, 1] and chosen == int(probability.argmax())
    marginal = estimator.keep_probability(patterns[1], logit, scaling=1.0)
    assert torch.allclose(marginal, probability @ patterns[1]) and marginal.sum() == pytest.approx(3.0)
    assert marginal.argsort(descending=True)[:3].sort().values.tolist() == [1, 3, 5]
    nothing = torch.zeros(1, 3)  # a lone remainder group that keeps no block
    assert estimator.pattern_probabilities(nothing, torch.zeros(3), 1.0).tolist() == [1.0]
    assert estimator.decide(nothing, torch.zeros(3)) == 0


# LoRA ------------------------------------------------------------------------------------------------------


def test_lora_starts_at_the_base_layer_trains_alone_and_goes_away() -> None:
    model = tiny_model("dit")
    x = torch.randn(2, 5, 64)
    block = model.transformer_blocks[1]
    linears = {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}
    with lora_linears([block], rank=4, alpha=8.0) as loras:
        assert len(loras) == len(linears) and all(isinstance(block.get_submodule(n), LoRALinear) for n in linears)
        lora = block.get_submodule("ff.net.2")
        assert lora.weight is linears["ff.net.2"].weight and lora.scale == 2.0
        assert torch.equal(lora(torch.randn(3, 256) * 0), torch.zeros(3, 64) + lora.base.bias)
        y = block.attn1.to_q(x)
        assert torch.equal(y, linears["attn1.to_q"](x))  # B starts at zero
        y.sum().backward()
        assert block.attn1.to_q.lora_b.grad is not None
    assert all(block.get_submodule(n) is m for n, m in linears.items())


def test_lora_merge_folds_the_adapter_into_the_base_weight() -> None:
    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    nn.init.normal_(lora.lora_b)
    x = torch.randn(3, 6)
    expected = lora(x).detach()
    lora.merge()
    torch.testing.assert_close(base(x), expected, atol=1e-6, rtol=1e-6)


def test_search_with_merge_lora_leaves_trained_weights_and_no_adapters() -> None:
    model = tiny_dit(layers=4)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = TinyFusionConfig(pattern="1:2", steps=3, batch_size=4, lr_lora=1e-2, merge_lora=True)
    tinyfusion_search(model, DIT, config, _data(), quiet=True)
    assert not any(isinstance(m, (LoRALinear, GatedBlock)) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == original.keys()
    changed = {k for k, v in after.items() if not torch.equal(v, original[k])}
    assert changed and all(k.startswith("transformer_blocks.") and k.endswith(".weight") for k in changed)


# the search ------------------------------------------------------------------------------------------------


def _data(count: int = 64) -> DistillData:
    gen = torch.Generator().manual_seed(0)
    ids = list(range(10))
    return DistillData(torch.randn(count, 4, 8, 8, generator=gen), torch.arange(count) % 10, ids, ids, 1000)


@pytest.mark.parametrize("estimator, draws", [("straight_through", 1), ("score_function", 4), ("plackett_luce", 4)])
def test_search_drops_an_identity_block_and_the_result_reloads(tmp_path, estimator: str, draws: int) -> None:
    model = tiny_dit(layers=4)  # groups (0, 1) and (2, 3); blocks 1 and 2 pass their input through
    _make_identity(model, DIT, {(DOUBLE, 1), (DOUBLE, 2)})
    original = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    config = TinyFusionConfig(pattern="1:2", steps=30, batch_size=8, lr_logits=1e-2, ema_decay=0.9, output_weight=1.0,
                              data_weight=0.0, condition_dropout=0.0, estimator=estimator, mask_draws=draws)
    result = tinyfusion_search(model, DIT, config, _data(), quiet=True)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded on a forked RNG
    assert result.keep == {DOUBLE: [0, 3]}
    first, second = result.decisions
    assert first.blocks == (0, 1) and first.kept == (0,) and first.patterns == [(0,), (1,)]
    assert second.kept == (3,) and second.probabilities[1] > 0.8 and first.probabilities[0] > 0.8
    assert sum(first.probabilities) == pytest.approx(1.0)
    assert len(result.history) == 30 and result.history[0]["tau"] == 4.0
    assert len(result.keep_probability) == 30 and len(result.keep_probability[0]) == len(result.blocks) == 4
    # the model is untouched: no LoRA, no gates, original weights and gradient flags
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training

    remove_blocks(model, DIT, result.keep)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.num_layers == 2 and len(loaded.transformer_blocks) == 2
    assert all(torch.equal(v, original[k.replace("transformer_blocks.1.", "transformer_blocks.3.")])
               for k, v in loaded.state_dict().items())
    assert torch.equal(predict("dit", loaded), predict("dit", model))


def test_search_is_seeded_and_runs_without_lora_on_flux() -> None:
    from compressdit.models.text_conditions import synthetic_text
    from tests.prune.test_prune_depth import POOLED_DIM, TEXT_DIM, TEXT_SEQ

    ids = synthetic_text(4, TEXT_SEQ, TEXT_DIM, POOLED_DIM, seed=3)
    data = DistillData(torch.randn(8, 4, 8, 8), torch.arange(8) % 4, ids, [0, 1, 2, 3], ids[0])
    config = TinyFusionConfig(pattern="1:2", steps=2, batch_size=2, lora=False)
    runs = [tinyfusion_search(tiny_model("flux"), FLUX, config, data, quiet=True) for _ in range(2)]
    assert runs[0].history == runs[1].history and runs[0].keep == runs[1].keep
    assert [len(v) for v in runs[0].keep.values()] == [1, 2]  # 2 double -> 1; 3 single -> (0, 1) keeps 1, (2,) 1
    assert {d.stack for d in runs[0].decisions} == {DOUBLE, SINGLE}


@pytest.mark.parametrize("changes, message", [({"pattern": "2:1"}, "pattern"), ({"steps": 0}, "steps"),
                                              ({"tau_start": 0.05}, "tau_start"), ({"ema_decay": 1.0}, "ema_decay"),
                                              ({"output_weight": 0.0, "data_weight": 0.0}, "not both 0"),
                                              ({"lora_rnk": 4}, "unknown key 'lora_rnk'"),
                                              ({"estimator": "gumbel"}, "estimator: unknown 'gumbel'; known: "
                                               "plackett_luce, score_function, straight_through"),
                                              ({"estimator": "score_function"}, "mask_draws: .* at least 2"),
                                              ({"mask_draws": 3, "batch_size": 32}, "multiple of mask_draws")])
def test_config_errors_name_the_key(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TinyFusionConfig.from_dict(changes, "prune")
