"""Streamed GPTQ equals the in-memory GPTQ bit for bit; its block-input cache is refused in one line when it would
not fit, and removed after the run, failed or not."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from compressdit.errors import CalibrationError, CheckpointError, ConfigError
from compressdit.io.shards import INDEX_NAME
from compressdit.pipeline import run_recipe
from compressdit.recipe import load_recipe
from tests.test_streaming import _tensors


def _w4a16(group_size: int = 16, everything: bool = False):
    """The shipped ``w4a16`` (GPTQ, act-order) without evaluate, groups fitting the tiny models, 3 samples x 2
    steps in batches of 2 (two batches: each block is called 4 times); ``everything``: embedders and head too."""
    recipe = load_recipe("w4a16")
    recipe.stages = [s for s in recipe.stages if s.name != "evaluate"]
    calibrate = recipe.stages[0].config
    calibrate.samples, calibrate.steps, calibrate.batch_size = 3, 2, 2
    rules = recipe.stages[1].config.options.rules
    rules[-1].spec.group_size = group_size
    if everything:
        recipe.stages[1].config.options.rules = [rules[-1]]
    return recipe


def _leftovers(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".compressdit-block-inputs-")
                  or ".tmp-" in p.name)


@pytest.mark.parametrize("family,everything", [("flux", False), ("dit", True)])
def test_streamed_gptq_equals_the_in_memory_gptq(family, everything, text_pipeline_dir, dit_pipeline_dir, tmp_path):
    """FLUX through its own T5 and CLIP; DiT with every linear rounded by GPTQ, including those kept in memory
    throughout (outside the blocks, and the first block's ``norm1.emb`` DiT calls after its block loop), whose
    Hessians come from the calibration pass itself. Same Hessians in the same order: codes and scales are equal."""
    folder = text_pipeline_dir("flux") if family == "flux" else dit_pipeline_dir
    in_memory = run_recipe(_w4a16(everything=everything), str(folder), tmp_path / "memory", quiet=True)
    streamed = run_recipe(_w4a16(everything=everything), str(folder), tmp_path / "streamed", quiet=True, stream=True)
    assert streamed.quant_specs == in_memory.quant_specs
    assert all(s.rounding == "gptq" and s.act_order for s in streamed.quant_specs.values())
    if everything:
        assert {"proj_out_1", "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1"} <= set(streamed.quant_specs)
    note = streamed.notes[-1]
    assert note.startswith(f"gptq: {len(streamed.quant_specs)} layers rounded from input Hessians over 3 samples x 2 "
                           "steps as in memory: each block's 4 recorded calls"), note
    ours, theirs = _tensors(tmp_path / "streamed" / "transformer"), _tensors(tmp_path / "memory" / "transformer")
    assert ours.keys() == theirs.keys() and any(k.endswith("weight_scale") for k in ours)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert _leftovers(tmp_path) == []  # the block-input cache went with the run


@pytest.fixture(scope="module")
def flux_pipeline(text_pipeline_dir):
    return text_pipeline_dir("flux")


def test_a_cache_over_the_budget_is_refused_in_one_line_before_any_output(flux_pipeline, tmp_path):
    from compressdit.cli import app

    with pytest.raises(CalibrationError, match=r"streamed GPTQ caches every block's calibration inputs on disk: about "
                                               r"\d\.\d\d MB \(3 blocks x 4 calls x 0\.\d\d MB\) but --max-cache is "
                                               r"0\.00 MB; calibrate on fewer samples or steps") as caught:
        run_recipe(_w4a16(), str(flux_pipeline), tmp_path / "out", quiet=True, stream=True, max_cache=1000)
    assert "\n" not in str(caught.value) and not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    recipe = tmp_path / "w4a16-g16.yaml"
    recipe.write_text(_w4a16().dump())
    result = CliRunner().invoke(app, ["run", str(recipe), "-m", str(flux_pipeline), "-o", str(tmp_path / "cli"),
                                      "--stream", "--max-cache", "1KB"])
    assert isinstance(result.exception, CalibrationError) and "but --max-cache is 0.00 MB" in str(result.exception)
    assert not (tmp_path / "cli").exists() and _leftovers(tmp_path) == []


def test_a_failure_after_calibration_removes_the_cache_and_leaves_no_output(flux_pipeline, tmp_path):
    """The last block's weight is cut short: the calibration reads it (and fails) after every other block's calls
    were recorded; neither the cache nor a half-written output stays."""
    broken = tmp_path / "broken"
    shutil.copytree(flux_pipeline, broken)
    folder = broken / "transformer"
    index = json.loads((folder / INDEX_NAME).read_text())["weight_map"] if (folder / INDEX_NAME).exists() else None
    name = max(n for n in (index or load_file(folder / "diffusion_pytorch_model.safetensors"))
               if n.startswith("single_transformer_blocks.") and n.endswith("proj_out.weight"))
    shard = folder / (index[name] if index else "diffusion_pytorch_model.safetensors")
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CheckpointError, match=f"tensor {name} has shape"):
        run_recipe(_w4a16(), str(broken), work / "out", quiet=True, stream=True)
    assert list(work.iterdir()) == []


def test_gptq_in_a_later_quantize_stage_is_refused(flux_pipeline, tmp_path):
    """In memory its Hessians would come from a model whose earlier stage's layers are already quantized."""
    path = tmp_path / "two-stages.yaml"
    path.write_text("""version: 1
name: two-stages
stages:
  - calibrate: {samples: 3, steps: 2, batch_size: 2}
  - quantize: {method: rtn, rules: [{match: proj_out, spec: {w_bits: 8, a_bits: null}}]}
  - quantize:
      method: rtn
      rules:
        - {match: "role:embedder", spec: null}
        - {match: "role:head", spec: null}
        - {match: "re:.*", spec: {w_bits: 4, a_bits: null, group_size: 16, rounding: gptq}}
""")
    with pytest.raises(ConfigError, match="is in a quantize stage after another one.*merge the quantize stages"):
        run_recipe(load_recipe(str(path)), str(flux_pipeline), tmp_path / "out", quiet=True, stream=True)
