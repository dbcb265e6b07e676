"""Tests for compressdit.calibration (stats hooks, calibration sets) and the calibrate stage on a tiny DiT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import compressdit.stages.calibrate as calibrate_module
from compressdit.calibration.sets import CALIBRATION_DIR, DEFAULT_SETS, load_conditions, resolve_set
from compressdit.calibration.stats import (ActivationStats, cache_key, capture_input_absmax,
                                           stats_from_recorder)
from compressdit.errors import CalibrationError, ConfigError
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.stages.base import PipelineState
from compressdit.stages.calibrate import CalibrateConfig, run_calibration
from tests.conftest import tiny_dit


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# -- capture_input_absmax -----------------------------------------------------------------------------------------

def test_capture_records_per_step_per_channel_absmax():
    model = _mlp()
    gen = torch.Generator().manual_seed(1)
    calls = [[torch.randn(4, 6, generator=gen) * 3 for _ in range(2)],   # step 0: two batches
             [torch.randn(2, 3, 6, generator=gen)]]                       # step 1: a 3-d input
    with capture_input_absmax(model, ["0", "2"]) as recorder:
        assert _hooks(model) == 2
        for step, inputs in enumerate(calls):
            recorder.step = step
            for x in inputs:
                model(x)
    stats = stats_from_recorder(recorder, timesteps=[900, 100])
    assert set(stats.absmax) == {"0", "2"} and stats.timesteps == [900, 100]
    # manual: layer 0 sees the raw inputs, layer 2 the GELU of layer 0's output
    for name, fn in (("0", lambda x: x), ("2", lambda x: model[1](model[0](x)))):
        with torch.no_grad():
            expected = torch.stack([torch.stack([fn(x).abs().reshape(-1, x.shape[-1] if name == "0" else 5).amax(0)
                                                 for x in inputs]).amax(0) for inputs in calls])
        assert stats.absmax[name].shape == (2, 6 if name == "0" else 5)
        assert stats.absmax[name].dtype == torch.float32
        assert torch.allclose(stats.absmax[name], expected, atol=1e-6)
    assert torch.equal(stats.channel_absmax("0"), stats.absmax["0"].amax(0))


def test_hooks_are_removed_after_normal_exit_and_after_an_exception():
    model = _mlp()
    with capture_input_absmax(model, ["0", "2"]):
        model(torch.randn(1, 6))
    assert _hooks(model) == 0 and not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    with pytest.raises(RuntimeError, match="sampling failed"):
        with capture_input_absmax(model, ["0", "2"]):
            model(torch.randn(1, 6))
            raise RuntimeError("sampling failed")
    assert _hooks(model) == 0 and not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_a_calibration_error_and_hooks_go_away(bad):
    model = _mlp()
    x = torch.randn(2, 6)
    x[1, 2] = bad
    with pytest.raises(CalibrationError, match="non-finite activation .* entering 0 at sampling step 3"):
        with capture_input_absmax(model, ["0"]) as recorder:
            recorder.step = 3
            model(x)
    assert not model[0]._forward_pre_hooks


def test_empty_capture_is_a_calibration_error():
    model = _mlp()
    with capture_input_absmax(model, ["0"]) as recorder:
        pass
    with pytest.raises(CalibrationError, match="no activations"):
        stats_from_recorder(recorder, [])


def test_activation_stats_save_load_round_trip(tmp_path):
    stats = ActivationStats({"a.b": torch.rand(3, 7), "c": torch.rand(3, 2)[:, :1]}, [999, 500, 1])  # non-contiguous
    path = tmp_path / "deep" / "stats.safetensors"
    stats.save(path)
    assert path.exists() and not path.with_suffix(".tmp").exists()
    loaded = ActivationStats.load(path)
    assert loaded.timesteps == [999, 500, 1]
    assert set(loaded.absmax) == {"a.b", "c"}
    for name, tensor in stats.absmax.items():
        assert torch.equal(loaded.absmax[name], tensor)


def test_cache_key_tracks_weights_and_settings():
    model = _mlp()
    key = cache_key(model, {"steps": 2})
    assert key == cache_key(_mlp(), {"steps": 2})
    assert key != cache_key(model, {"steps": 3})
    with torch.no_grad():
        model[2].weight[0, 0] += 0.5
    assert key != cache_key(model, {"steps": 2})


# -- calibration sets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["class", "text"])
def test_shipped_sets_load_through_datasets(kind):
    path = resolve_set(None, kind)
    assert path == CALIBRATION_DIR / f"{DEFAULT_SETS[kind]}.jsonl"
    assert resolve_set(DEFAULT_SETS[kind], kind) == path
    values = load_conditions(path, kind)
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert values == [row["class_id" if kind == "class" else "prompt"] for row in lines]
    if kind == "class":
        assert all(isinstance(v, int) and 0 <= v < 1000 for v in values)
    else:
        assert all(isinstance(v, str) and v for v in values)
    cycled = load_conditions(path, kind, limit=len(values) + 3)
    assert cycled == values + values[:3]


def test_jsonl_with_the_wrong_field_is_a_config_error(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"label": 3}\n{"label": 4}\n')
    with pytest.raises(ConfigError, match="has no 'class_id' field"):
        load_conditions(resolve_set(str(path), "class"), "class")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n')
    with pytest.raises(ConfigError, match="has no 'class_id' field"):  # a text set for a class model
        load_conditions(prompts, "class")
    assert load_conditions(prompts, "text") == ["a cat"]


def test_class_ids_out_of_range_and_malformed_files_are_config_errors(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text('{"class_id": 3}\n{"class_id": 1000}\n')
    with pytest.raises(ConfigError, match=r"integers in \[0, 1000\)"):
        load_conditions(path, "class")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"class_id": 3\n')
    with pytest.raises(ConfigError, match="cannot read calibration file"):
        load_conditions(broken, "class")


def test_missing_calibration_file_or_set_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_set(str(tmp_path / "nope.jsonl"), "class")
    with pytest.raises(ConfigError, match="unknown calibration set 'imagenet-val'; shipped sets: .*fmnist-classes"):
        resolve_set("imagenet-val", "class")


# -- the calibrate stage ------------------------------------------------------------------------------------------

def test_run_calibration_on_a_tiny_dit_and_disk_cache(tmp_path, monkeypatch):
    model = tiny_dit()
    adapter = adapter_for(model)
    state = PipelineState(source=ModelSource("tiny", tmp_path, model), adapter=adapter, model=model,
                          workdir=tmp_path, reference_spec="tiny", quiet=True, cache_dir=tmp_path / "cache")
    config = CalibrateConfig(samples=4, steps=2, batch_size=4, guidance=4.0)
    linears = adapter.linear_layers(model)
    # an independent record of what to_q sees, call by call (one batched CFG call per step)
    seen = []
    probe = model.transformer_blocks[1].attn1.to_q.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0)))
    try:
        stats = run_calibration(state, config)
    finally:
        probe.remove()
    assert set(stats.absmax) == set(linears)
    for name, linear in linears.items():
        assert stats.absmax[name].shape == (config.steps, linear.in_features), name
        assert torch.isfinite(stats.absmax[name]).all() and (stats.absmax[name] >= 0).all()
    assert len(stats.timesteps) == config.steps and stats.timesteps[0] > stats.timesteps[1]
    assert len(seen) == config.steps
    assert torch.allclose(stats.absmax["transformer_blocks.1.attn1.to_q"], torch.stack(seen))
    assert _hooks(model) == 0
    cached = list((tmp_path / "cache" / "calibration").glob("*.safetensors"))
    assert len(cached) == 1

    def no_sampling(*args, **kwargs):
        raise AssertionError("the disk cache was not used")

    monkeypatch.setattr(calibrate_module, "sample", no_sampling)
    again = run_calibration(state, config)
    assert again.timesteps == stats.timesteps
    assert all(torch.equal(again.absmax[name], stats.absmax[name]) for name in linears)
    # other settings miss the cache and do sample
    with pytest.raises(AssertionError, match="disk cache was not used"):
        run_calibration(state, CalibrateConfig(samples=4, steps=2, batch_size=4, guidance=4.0, seed=5))


def test_calibrate_config_is_strict():
    assert CalibrateConfig.from_dict({"samples": 4, "steps": 2}).samples == 4
    with pytest.raises(ConfigError, match=r"calibrate\.steps: must be positive"):
        CalibrateConfig.from_dict({"steps": 0}, "calibrate")
    with pytest.raises(ConfigError, match="unknown key 'sample'"):
        CalibrateConfig.from_dict({"sample": 4}, "calibrate")


def test_calibration_with_a_path_in_a_recipe_resolves_relative_files(tmp_path, monkeypatch):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"class_id": 5}\n')
    monkeypatch.chdir(tmp_path)
    assert resolve_set("mine.jsonl", "class") == Path("mine.jsonl")
    assert load_conditions(resolve_set("mine.jsonl", "class"), "class", limit=3) == [5, 5, 5]


def test_mean_squares_per_step_are_recorded_and_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    with capture_input_absmax(model, ["0"]) as recorder:
        for step, scale in ((0, 1.0), (1, 3.0)):
            recorder.step = step
            model(torch.full((2, 5, 4), scale))
            model(torch.full((1, 4), -scale))
    stats = stats_from_recorder(recorder, [900, 100])
    assert torch.allclose(stats.meansq["0"], torch.tensor([[1.0] * 4, [9.0] * 4]))
    stats.save(tmp_path / "s.safetensors")
    loaded = ActivationStats.load(tmp_path / "s.safetensors")
    assert set(loaded.absmax) == {"0"} and torch.equal(loaded.meansq["0"], stats.meansq["0"])
