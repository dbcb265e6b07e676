"""Tests for compressdit.prune.ppcl: probes, CKA, replaceability, unit planning and contiguous distillation."""

from __future__ import annotations

import pytest
import torch

from compressdit.distill.data import DistillData
from compressdit.errors import ConfigError
from compressdit.models import ADAPTERS
from compressdit.models.text_conditions import synthetic_text
from compressdit.prune.depth import remove_blocks
from compressdit.prune.ppcl import (PPCLConfig, Unit, _NormalEquations, _probe, fit_probes, linear_cka, plan_units,
                                    ppcl_prune, simulate, unit_loss)
from tests.conftest import tiny_dit, tiny_flux
from tests.prune.test_prune_importance import _make_identity

torch.set_num_threads(1)
DIT, FLUX = ADAPTERS.get("dit"), ADAPTERS.get("flux")
BLOCKS = "transformer_blocks"


def _data(family: str, model) -> DistillData:
    adapter = ADAPTERS.get(family)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(32, *adapter.latent_shape(model), generator=gen)
    if family == "dit":
        conditions, null = list(range(10)), adapter.null_conditions(1)[0]
    else:
        conditions = synthetic_text(11, 4, model.config.joint_attention_dim, model.config.pooled_projection_dim)
        null = conditions.pop()
    return DistillData(latents, torch.arange(32) % 10, conditions, list(range(10)), null)


def _batches(family: str, model, count: int = 2, size: int = 4) -> list[tuple]:
    from compressdit.distill.data import BatchSampler, condition_table, select
    from compressdit.distill.objectives import objective_for

    adapter = ADAPTERS.get(family)
    data = _data(family, model)
    sampler = BatchSampler(data, objective_for(adapter), 0.0)
    table, gen = condition_table(adapter, model, data), torch.Generator().manual_seed(1)
    return [(b.x_t, b.timestep, select(table, b.condition_rows))
            for b in (sampler.draw(size, gen) for _ in range(count))]


# probes and CKA --------------------------------------------------------------------------------------------


def test_normal_equations_recover_a_linear_map() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen)
    equations = _NormalEquations()
    for _ in range(3):  # accumulated over batches of [batch, tokens, channels]
        x = torch.randn(4, 10, 6, generator=gen)
        equations.add(x, x @ weight + bias)
    probe, r2 = equations.solve(ridge=0.0)
    x = torch.randn(7, 6, generator=gen)
    torch.testing.assert_close(_probe(probe, x), x @ weight + bias, atol=1e-5, rtol=1e-5)
    assert r2 == pytest.approx(1.0, abs=1e-9)
    noisy = _NormalEquations()
    x = torch.randn(200, 6, generator=gen)
    noisy.add(x, x @ weight + 3 * torch.randn(200, 5, generator=gen))
    assert 0 < noisy.solve(ridge=1e-3)[1] < 0.9


def test_linear_cka_is_one_for_equivalent_representations_and_small_for_unrelated() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 8, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen))
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert linear_cka(x, 3 * x @ rotation + 1) == pytest.approx(1.0)  # scale, rotation, shift invariant
    assert linear_cka(x, torch.randn(500, 8, generator=gen)) < 0.1


@pytest.mark.parametrize("family, model", [("dit", lambda: tiny_dit(layers=3)),
                                           ("flux", lambda: tiny_flux(1, 2, 2, 24, 20))])
def test_probes_of_identity_blocks_are_exact_and_fully_replaceable(family: str, model) -> None:
    model, adapter = model().eval(), ADAPTERS.get(family)
    identity = (adapter.block_list(model)[1][0], adapter.block_list(model)[1][1])
    _make_identity(model, adapter, {identity})
    batches = _batches(family, model)
    probes, r2 = fit_probes(model, adapter, batches, ridge=0.0)
    assert set(probes) == {(s, i) for s, i, _ in adapter.block_list(model)}
    if family == "flux":  # joint blocks return (and get probes for) both streams
        assert set(probes[identity]) == {"hidden_states", "encoder_hidden_states"}
    assert r2[identity] == pytest.approx(1.0, abs=1e-6)
    scores = simulate(model, adapter, probes, batches)
    assert scores[identity] == pytest.approx(1.0, abs=1e-6)
    assert all(0 <= v <= 1 + 1e-9 for v in scores.values())
    assert min(scores.values()) < 0.999  # a real (random) block is not linear


# unit planning ---------------------------------------------------------------------------------------------


def test_plan_units_merges_the_most_replaceable_run_and_meets_the_budget() -> None:
    profile = [0.5, 0.6, 0.99, 0.98, 0.99, 0.55, 0.5, 0.6]
    units = plan_units(profile, keep=6, max_unit=3, trend_weight=1.0, stack=BLOCKS)
    assert len(units) == 6 and [u.size for u in units] == [1, 1, 3, 1, 1, 1]
    assert units[2] == Unit(BLOCKS, 2, 4, student=3)  # its least replaceable block seeds the student
    assert [b for u in units for b in range(u.start, u.end + 1)] == list(range(8))  # contiguous cover
    for keep in range(3, 9):
        units = plan_units(profile, keep=keep, max_unit=3, trend_weight=1.0, stack=BLOCKS)
        assert len(units) == keep and max(u.size for u in units) <= 3


def test_student_block_is_the_least_replaceable_or_the_middle() -> None:
    profile = [0.9, 0.8, 0.95, 0.99, 0.97]
    (unit,) = plan_units(profile, keep=1, max_unit=5, trend_weight=1.0, stack=BLOCKS)
    assert (unit.start, unit.end, unit.student) == (0, 4, 1)
    (unit,) = plan_units(profile, keep=1, max_unit=5, trend_weight=1.0, stack=BLOCKS, student_init="middle")
    assert unit.student == 2 and plan_units([0.9] * 4, 1, 4, 0.0, BLOCKS, "middle")[0].student == 1
    assert plan_units([0.9] * 4, 1, 4, 0.0, BLOCKS)[0].student == 0  # ties: the earlier block


def test_plan_units_avoids_trend_breaks() -> None:
    # blocks 1 and 2 are equally replaceable, but a sharp break lies between 2 and 3: without the trend term
    # merging 2-3 is as good as 1-2; with it, the unit stays on one side of the break
    profile = [0.5, 0.9, 0.9, 0.2, 0.9]
    units = plan_units(profile, keep=4, max_unit=2, trend_weight=1.0, stack=BLOCKS)
    merged = [u for u in units if u.size > 1]
    assert merged == [Unit(BLOCKS, 1, 2, student=1)]


def test_plan_units_refuses_impossible_budgets() -> None:
    with pytest.raises(ConfigError, match="cannot cut 8 blocks into 2 units of at most 3"):
        plan_units([0.5] * 8, keep=2, max_unit=3, trend_weight=1.0, stack=BLOCKS)


def test_unit_loss_is_scale_invariant_per_token() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    assert unit_loss({"hidden_states": 2 * a}, {"hidden_states": a}) == pytest.approx(0.0, abs=1e-6)
    two = unit_loss({"hidden_states": a, "encoder_hidden_states": b}, {"hidden_states": b, "encoder_hidden_states": b})
    assert two == pytest.approx(float(unit_loss({"hidden_states": a}, {"hidden_states": b})))


# the method ------------------------------------------------------------------------------------------------


def test_ppcl_prune_trains_students_into_their_seed_blocks() -> None:
    model, adapter = tiny_dit(layers=6).eval(), DIT
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    config = PPCLConfig(ratio=0.5, max_unit=3, probe_batches=2, simulation_batches=1, steps=20, batch_size=8,
                        lr=1e-3, warmup=0)
    result = ppcl_prune(model, adapter, config, _data("dit", model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert sum(u.size for u in result.units) == 6 and len(result.units) == 3
    assert result.keep == {BLOCKS: [u.student for u in result.units]}
    trained = tuple(f"{BLOCKS}.{u.student}." for u in result.units if u.size > 1)
    after = model.state_dict()
    assert trained and all(torch.equal(after[n], v) for n, v in before.items() if not n.startswith(trained))
    assert any(not torch.equal(after[n], v) for n, v in before.items() if n.startswith(trained))
    assert len(result.history) == 20
    assert set(result.unit_error) == {f"{BLOCKS}[{u.start}-{u.end}]" for u in result.units if u.size > 1}
    assert all(after < before for before, after in result.unit_error.values())  # on held-out batches
    remove_blocks(model, adapter, result.keep)
    assert model.config.num_layers == 3


def test_a_unit_at_the_start_keeps_the_first_blocks_head_embedding() -> None:
    model, adapter = tiny_dit(layers=4).eval(), DIT
    first_emb = {k: v.clone() for k, v in model.transformer_blocks[0].norm1.emb.state_dict().items()}
    config = PPCLConfig(ratio=0.5, max_unit=3, probe_batches=1, simulation_batches=1, steps=2, batch_size=4)
    result = ppcl_prune(model, adapter, config, _data("dit", model))
    start = next(u for u in result.units if u.start == 0)
    if start.size > 1 and start.student != 0:
        emb = model.transformer_blocks[start.student].norm1.emb.state_dict()
        assert all(torch.equal(emb[k], v) for k, v in first_emb.items())
    remove_blocks(model, adapter, result.keep)
    for k, v in model.transformer_blocks[0].norm1.emb.state_dict().items():  # the head reads block 0's
        assert torch.equal(v, first_emb[k])


def test_ppcl_prune_on_flux_prunes_both_stacks_and_runs() -> None:
    model, adapter = tiny_flux(2, 4, 2, 24, 20).eval(), FLUX
    config = PPCLConfig(ratio=0.5, max_unit=3, probe_batches=1, simulation_batches=1, steps=2, batch_size=4)
    result = ppcl_prune(model, adapter, config, _data("flux", model))
    assert {k: len(v) for k, v in result.keep.items()} == {BLOCKS: 1, "single_transformer_blocks": 2}
    remove_blocks(model, adapter, result.keep)
    x_t, timestep, cond = _batches("flux", model, count=1)[0]
    out = adapter.predict(model, x_t, timestep, cond)
    assert out.shape == x_t.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("key, value, message", [
    ("ratio", 1.0, r"ratio: .* \(0, 1\)"), ("max_unit", 1, "max_unit"), ("steps", -1, "steps: must be >= 0"),
    ("simulation_batches", 9, "at most probe_batches"), ("condition_dropout", 1.0, "condition_dropout")])
def test_bad_configs_are_config_errors(key: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PPCLConfig(**{key: value}).validate("ppcl")
