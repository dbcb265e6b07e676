"""Streaming quantization equals the in-memory path bit for bit, reloads with stock diffusers, fails cleanly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from compressdit.errors import CalibrationError, CheckpointError, ConfigError
from compressdit.io.shards import INDEX_NAME
from compressdit.io.sources import load_transformer
from compressdit.models import adapter_for
from compressdit.pipeline import run_recipe
from compressdit.recipe import load_recipe
from compressdit.streaming import stream_quantize
from tests.conftest import tiny_flux


def _recipe(name: str):
    recipe = load_recipe(name)
    recipe.stages = [s for s in recipe.stages if s.name != "evaluate"]
    return recipe


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A tiny FLUX transformer saved in bf16 as several shards."""
    folder = tmp_path_factory.mktemp("stream") / "flux"
    tiny_flux(2, 2, 4, 64, 64).to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 3
    return folder


@pytest.mark.parametrize("recipe", ["rtn-w8a8", "rtn-w4a16"])
def test_streamed_checkpoint_equals_in_memory_one(flux_dir, tmp_path, recipe):
    in_memory = run_recipe(_recipe(recipe), str(flux_dir), tmp_path / "memory", quiet=True)
    streamed = run_recipe(_recipe(recipe), str(flux_dir), tmp_path / "streamed", quiet=True, stream=True)
    assert not any("streamed" in n for n in in_memory.notes) and streamed.notes[0] == "streamed (--stream)"
    assert streamed.quant_specs == in_memory.quant_specs
    ours, theirs = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    assert config["quantization_config"]["pre_quantization_dtype"] == "bfloat16"
    assert (tmp_path / "streamed" / "compressdit_recipe.yaml").exists()
    assert (tmp_path / "streamed" / "MODEL_CARD.md").exists()


def test_streamed_shards_and_index_are_save_pretrained_s_and_reload_stock(flux_dir, tmp_path):
    """Small shards: the same files and index as save_pretrained of the in-memory model; stock from_pretrained
    (after ``import compressdit``) loads them and predicts what the in-memory model predicts."""
    from diffusers import FluxTransformer2DModel

    import compressdit  # noqa: F401
    from compressdit.models.sampling import initial_latents

    stream_quantize(_recipe("rtn-w8a8"), flux_dir, tmp_path / "streamed", quiet=True, max_shard_size="80KB")
    run_recipe(_recipe("rtn-w8a8"), str(flux_dir), tmp_path / "memory", quiet=True)
    model = load_transformer(tmp_path / "memory")
    model.save_pretrained(tmp_path / "resaved", max_shard_size="80KB")
    index = json.loads((tmp_path / "streamed" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert index == json.loads((tmp_path / "resaved" / INDEX_NAME).read_text())
    assert sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors")) == \
        sorted(p.name for p in (tmp_path / "resaved").glob("*.safetensors"))
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "streamed").eval()
    adapter = adapter_for(model)
    cond = adapter.synthetic_conditioning(model, 2, seed=1)
    x, t = initial_latents(adapter, model, 2, seed=1), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(adapter.predict(reloaded, x, t, cond), adapter.predict(model, x, t, cond))


def test_streams_a_pipeline_folder_automatically_over_the_memory_budget(dit_pipeline_dir, tmp_path):
    state = run_recipe(_recipe("rtn-w8a8"), str(dit_pipeline_dir), tmp_path / "out", quiet=True, max_memory=1000)
    assert state.notes[0].startswith("streamed: the model needs") and "--max-memory of 0.0 GB" in state.notes[0]
    assert (tmp_path / "out" / "vae" / "config.json").exists() and (tmp_path / "out" / "model_index.json").exists()
    memory = run_recipe(_recipe("rtn-w8a8"), str(dit_pipeline_dir), tmp_path / "memory", quiet=True,
                        max_memory=10 ** 12)
    assert not any("streamed" in n for n in memory.notes)
    ours, theirs = _tensors(tmp_path / "out" / "transformer"), _tensors(tmp_path / "memory" / "transformer")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def _copy(folder, to):
    to.mkdir()
    for path in folder.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def test_a_failure_at_the_last_block_leaves_no_output(flux_dir, tmp_path):
    from safetensors.torch import save_file

    broken = _copy(flux_dir, tmp_path / "broken")
    name = "single_transformer_blocks.1.proj_out.weight"
    shard = broken / json.loads((broken / INDEX_NAME).read_text())["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"tensor {name} has shape \\[64, 319\\] in the weights but "
                                              "config.json implies \\[64, 320\\]"):
        run_recipe(_recipe("rtn-w8a8"), str(broken), out, quiet=True, stream=True)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_tensor_the_config_does_not_use_is_an_error(flux_dir, tmp_path):
    from safetensors.torch import save_file

    broken = _copy(flux_dir, tmp_path / "broken")
    index = json.loads((broken / INDEX_NAME).read_text())
    shard = broken / index["weight_map"]["x_embedder.weight"]
    tensors = load_file(shard)
    save_file({**tensors, "extra.weight": torch.zeros(2)}, shard, metadata={"format": "pt"})
    index["weight_map"]["extra.weight"] = shard.name
    (broken / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="tensor extra.weight that config.json does not use"):
        run_recipe(_recipe("rtn-w8a8"), str(broken), tmp_path / "out", quiet=True, stream=True)


def test_a_truncated_shard_fails_before_any_work(flux_dir, tmp_path):
    broken = _copy(flux_dir, tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        run_recipe(_recipe("rtn-w8a8"), str(broken), tmp_path / "out", quiet=True, stream=True)
    assert not (tmp_path / "out").exists()


ADAROUND = """version: 1
name: adaround-fp4
stages:
  - calibrate: {samples: 2, steps: 1}
  - quantize:
      method: rtn
      rules: [{match: "re:.*", spec: {format: e2m1, w_bits: 4, group_size: 16, rounding: adaround}}]
"""


@pytest.mark.parametrize("recipe,error,match", [
    ("rtn-w8a8", ConfigError, "stage 'evaluate' cannot stream: .*pass --no-eval"),
    ("w4a8", ConfigError, "method 'viditq' as configured quantizes layers jointly \\(mixed precision"),
    ("adaround", CalibrationError, "rounding 'adaround'\\) needs block reconstruction from cached block inputs "
                                   "\\(AdaRound\\).*stream a recipe that rounds with rtn or gptq \\(w4a16, gptq-w4a16"),
    ("fp4-w4a8", ConfigError, "method 'fp4dit' as configured quantizes layers jointly"),
])
def test_unstreamable_recipes_are_refused_in_one_line(flux_dir, tmp_path, recipe, error, match):
    """GPTQ streams (tests/test_streaming_gptq.py); AdaRound's block reconstruction still does not."""
    if recipe == "adaround":
        (tmp_path / "adaround.yaml").write_text(ADAROUND)
        recipe = str(tmp_path / "adaround.yaml")
    loaded = load_recipe(recipe) if recipe == "rtn-w8a8" else _recipe(recipe)
    with pytest.raises(error, match=match) as caught:
        run_recipe(loaded, str(flux_dir), tmp_path / "out", quiet=True, stream=True)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists()


def test_a_balancing_recipe_without_calibrate_stage_is_refused(flux_dir, tmp_path):
    recipe = _recipe("w8a8")
    recipe.stages = [s for s in recipe.stages if s.name != "calibrate"]
    with pytest.raises(CalibrationError, match="needs a calibrate stage before quantize"):
        run_recipe(recipe, str(flux_dir), tmp_path / "out", quiet=True, stream=True)


@pytest.mark.parametrize("family,recipe", [("flux", "w8a8"), ("dit", "w8a8")])
def test_streamed_calibrated_checkpoint_equals_in_memory_one(family, recipe, text_pipeline_dir, dit_pipeline_dir,
                                                             tmp_path):
    """ViDiT-Q with channel balancing from a calibration run on the skeleton, blocks read one at a time; FLUX's
    prompts go through the pipeline's own T5 and CLIP."""
    folder = text_pipeline_dir("flux") if family == "flux" else dit_pipeline_dir
    calibrated = _recipe(recipe)
    calibrated.stages[0].config.samples, calibrated.stages[0].config.steps = 3, 2
    in_memory = run_recipe(calibrated, str(folder), tmp_path / "memory", quiet=True)
    streamed = run_recipe(calibrated, str(folder), tmp_path / "streamed", quiet=True, stream=True)
    assert streamed.quant_specs == in_memory.quant_specs
    assert any(s.balance for s in streamed.quant_specs.values())
    assert "at most 1 block in memory at once" in streamed.notes[2]
    ours, theirs = _tensors(tmp_path / "streamed" / "transformer"), _tensors(tmp_path / "memory" / "transformer")
    assert any(k.endswith("smooth_scale") for k in ours) and ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_already_compressed_source_is_refused(flux_dir, tmp_path):
    run_recipe(_recipe("rtn-w8a8"), str(flux_dir), tmp_path / "q", quiet=True)
    with pytest.raises(CheckpointError, match="already compressed"):
        run_recipe(_recipe("rtn-w4a16"), str(tmp_path / "q"), tmp_path / "out", quiet=True, stream=True)


def test_cli_max_memory_streams_and_reports_it(flux_dir, tmp_path):
    from compressdit.cli import app

    result = CliRunner().invoke(app, ["quantize", str(flux_dir), "-r", "rtn-w4a16", "--no-eval", "--max-memory",
                                      "1KB", "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["notes"][0].startswith("streamed: the model needs") and payload["quantized_modules"] > 0
    bad = CliRunner().invoke(app, ["quantize", str(flux_dir), "-r", "rtn-w4a16", "--max-memory", "lots",
                                   "-o", str(tmp_path / "bad")])
    assert isinstance(bad.exception, ConfigError) and "--max-memory lots: not a size like 20GB" in str(bad.exception)


def test_a_device_without_streaming_is_refused_in_one_line(flux_dir, tmp_path):
    with pytest.raises(ConfigError, match="--device meta applies to streamed runs"):
        run_recipe(_recipe("rtn-w8a8"), str(flux_dir), tmp_path / "out", quiet=True, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family,recipe", [("flux", "rtn-w8a8"), ("dit", "w8a8")])
def test_streamed_on_cuda_matches_the_in_memory_cpu_checkpoint(family, recipe, flux_dir, dit_pipeline_dir, tmp_path):
    """One block at a time on the GPU (calibration and quantization), outputs written from the CPU: the same
    tensors as the in-memory CPU run up to float differences (a code off by one in under 1% of the weights)."""
    folder = flux_dir if family == "flux" else dit_pipeline_dir
    sub = "" if family == "flux" else "transformer"
    calibrated = _recipe(recipe)
    if calibrated.stages[0].name == "calibrate":
        calibrated.stages[0].config.samples, calibrated.stages[0].config.steps = 3, 2
    in_memory = run_recipe(calibrated, str(folder), tmp_path / "memory", quiet=True)
    torch.cuda.reset_peak_memory_stats()
    streamed = run_recipe(calibrated, str(folder), tmp_path / "cuda", quiet=True, stream=True, device="cuda")
    whole = sum(t.numel() * 4 for t in _tensors(folder / sub if sub else folder).values())  # float32 once loaded
    assert torch.cuda.max_memory_allocated() < whole  # never the whole model on the device
    assert streamed.quant_specs == in_memory.quant_specs
    ours, theirs = _tensors(tmp_path / "cuda" / sub), _tensors(tmp_path / "memory" / sub)
    assert ours.keys() == theirs.keys() and all(ours[k].dtype == theirs[k].dtype for k in ours)
    for name, tensor in ours.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor.float(), theirs[name].float(), rtol=1e-3, atol=1e-6)
        else:
            differ = tensor.int() - theirs[name].int()
            assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 0.01, name
