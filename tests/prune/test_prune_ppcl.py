"""Tests for compressdit.prune.ppcl: probes, CKA, replaceability, unit planning and contiguous distillation."""

from __future__ import annotations

import pytest
import torch

from compressdit.distill.data import DistillData
from compressdit.errors import ConfigError
from compressdit.models import ADAPTERS
from compressdit.models.text_conditions import synthetic_text
from compressdit.prune.depth import remove_blocks
from compressdit.prune.ppcl import (PPCLConfig, Unit, choose_units, load_training, plan_units, plug_units,
                                    ppcl_prune,
                                    ppcl_train, save_training, unit_loss)
from tests.conftest import tiny_dit, tiny_flux

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
    assert len(result.training.history) == 20
    assert set(result.training.unit_error) == {f"{BLOCKS}[{u.start}-{u.end}]" for u in result.units if u.size > 1}
    assert all(after < before for before, after in result.training.unit_error.values())  # on held-out batches
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


def test_one_training_serves_every_plug_ratio_and_survives_the_disk(tmp_path) -> None:
    model, adapter = tiny_dit(layers=8).eval(), DIT
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = PPCLConfig(ratio=0.5, max_unit=2, probe_batches=1, simulation_batches=1, steps=3, batch_size=4)
    training = ppcl_train(model, adapter, config, _data("dit", model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # trained aside
    assert [u.size for u in training.units] == [2, 2, 2, 2]
    save_training(training, tmp_path / "run")
    loaded = load_training(tmp_path / "run")
    assert loaded.units == training.units and loaded.unit_error == training.unit_error
    assert loaded.replaceability == training.replaceability and loaded.history == training.history
    assert all(torch.equal(loaded.students[n][k], v) for n, state in training.students.items() for k, v in state.items())

    by_error = sorted(loaded.units, key=lambda u: loaded.unit_error[f"{BLOCKS}[{u.start}-{u.end}]"][1])
    for plug, plugged in [(0.125, 1), (0.25, 2), (0.3, 2), (0.5, 4), (None, 4)]:
        copy = tiny_dit(layers=8).eval()
        copy.load_state_dict(before)
        result = plug_units(copy, adapter, loaded, plug)
        assert set(result.plugged) == set(by_error[:plugged])
        assert len(result.keep[BLOCKS]) == 8 - plugged
        for unit in by_error[plugged:]:  # unplugged units keep both blocks, which reproduce themselves
            assert {unit.start, unit.end} <= set(result.keep[BLOCKS]) and unit.start in result.reproduces[BLOCKS]
        for unit in result.plugged:
            assert unit.student in result.keep[BLOCKS] and unit.end in result.reproduces[BLOCKS]
            block = copy.transformer_blocks[unit.student].state_dict()
            assert all(torch.equal(block[k], v) for k, v in loaded.students[f"{BLOCKS}[{unit.start}-{unit.end}]"].items())
        assert len(result.reproduces[BLOCKS]) == len(result.keep[BLOCKS])
        remove_blocks(copy, adapter, result.keep)
        assert copy.config.num_layers == 8 - plugged


def test_choose_units_removes_the_most_blocks_allowed_at_the_least_error() -> None:
    from compressdit.prune.ppcl import PPCLTraining

    units = [Unit(BLOCKS, 0, 2, 1), Unit(BLOCKS, 3, 4, 3), Unit(BLOCKS, 5, 6, 5), Unit(BLOCKS, 7, 7, 7)]
    errors = {"transformer_blocks[0-2]": 0.1, "transformer_blocks[3-4]": 0.3, "transformer_blocks[5-6]": 0.2}
    training = PPCLTraining({}, {}, units, unit_error={k: (1.0, v) for k, v in errors.items()})
    assert choose_units(training, 0) == []
    assert choose_units(training, 1) == [units[2]]  # the cheaper of the two single-block units
    assert choose_units(training, 2) == [units[0]]  # 0.1 beats [3-4] + [5-6] (0.5)
    assert set(choose_units(training, 3)) == {units[0], units[2]}
    assert set(choose_units(training, 9)) == set(units[:3])  # every merged unit: 4 blocks


@pytest.mark.parametrize("key, value, message", [
    ("ratio", 1.0, r"ratio: .* \(0, 1\)"), ("max_unit", 1, "max_unit"), ("steps", -1, "steps: must be >= 0"),
    ("simulation_batches", 9, "at most probe_batches"), ("condition_dropout", 1.0, "condition_dropout"),
    ("plug", 0.6, r"plug: .* \(0, ratio = 0.5\]"), ("plug", 0.0, "plug")])
def test_bad_configs_are_config_errors(key: str, value, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        PPCLConfig(**{key: value}).validate("ppcl")
