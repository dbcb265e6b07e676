"""Tests for the ``prune`` stage: recipe parsing, each method on a tiny DiT pipeline, ``block_origin``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressdit.errors import ConfigError
from compressdit.models import ADAPTERS
from compressdit.recipe import Recipe
from compressdit.stages import STAGES
from compressdit.stages.prune import PRUNE_METHODS, ImportanceConfig, PPCLStageConfig, TinyFusionStageConfig
from compressdit.zoo.data import fmnist_dir
from tests.conftest import folder_state, save_dit_pipeline

torch.set_num_threads(1)
DIT = ADAPTERS.get("dit")
BLOCKS = "transformer_blocks"
needs_fmnist = pytest.mark.skipif(not (fmnist_dir() / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
SMALL = {
    "block_influence": {"ratio": 0.5, "samples": 2, "steps": 2},
    "removal_error": {"ratio": 0.5, "samples": 2, "steps": 2},
    "tinyfusion": {"pattern": "1:2", "steps": 3, "batch_size": 4, "data": {"source": "fmnist", "images": 16}},
    "ppcl": {"ratio": 0.5, "max_unit": 2, "student_init": "middle", "probe_batches": 1, "simulation_batches": 1, "steps": 2,
             "batch_size": 4, "data": {"source": "fmnist", "images": 16}},
}
TRAINS = ("tinyfusion", "ppcl")  # methods that read Fashion-MNIST


def _recipe(prune: dict) -> dict:
    return {"version": 1, "name": "p", "stages": [{"prune": prune}]}


def test_methods_are_registered() -> None:
    assert list(PRUNE_METHODS) == ["block_influence", "ppcl", "removal_error", "tinyfusion"]


@pytest.mark.parametrize("method", list(SMALL))
def test_recipe_parses_each_method_and_round_trips(method: str) -> None:
    recipe = Recipe.from_dict(_recipe({"method": method, **SMALL[method]}))
    config = recipe.stage("prune").config
    assert config.method == method
    expected = {"tinyfusion": TinyFusionStageConfig, "ppcl": PPCLStageConfig}.get(method, ImportanceConfig)
    assert isinstance(config.options, expected)
    assert Recipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("prune, message", [
    ({"ratio": 0.5}, r"prune: needs a 'method' \(one of: block_influence, ppcl, removal_error, tinyfusion\)"),
    ({"method": "shortgpt"}, "unknown method 'shortgpt'; known: block_influence"),
    ({"method": "block_influence", "ratoi": 0.5}, "unknown key 'ratoi'"),
    ({"method": "tinyfusion", "ratio": 0.5}, "unknown key 'ratio'"),  # tinyfusion takes a pattern
    ({"method": "block_influence", "ratio": 1.5}, r"ratio: .* \(0, 1\), got 1.5"),
    ({"method": "removal_error", "ratio": 0.0}, r"ratio: .* \(0, 1\), got 0.0"),
    ({"method": "tinyfusion", "pattern": "3:2"}, "pattern: '3:2'"),
    ({"method": "tinyfusion", "data": {"source": "fmnist", "images": 0}}, "data.images: must be positive"),
    ({"method": "ppcl", "data": "imagenet"}, "unknown data source 'imagenet'"),
    ({"method": "ppcl", "max_unit": 1}, "max_unit: a unit must be able to merge 2 blocks"),
    ({"method": "ppcl", "simulation_batches": 5}, r"simulation_batches: at most probe_batches \(4\)"),
    ({"method": "ppcl", "pattern": "1:2"}, "unknown key 'pattern'"),
])
def test_bad_prune_stages_are_config_errors(prune: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Recipe.from_dict(_recipe(prune), "bad.yaml")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    return save_dit_pipeline(tmp_path_factory.mktemp("prune") / "pipe", layers=4)


@pytest.mark.parametrize("method", [pytest.param(m, marks=needs_fmnist) if m in TRAINS else m for m in SMALL])
def test_stage_removes_blocks_and_records(method: str, pipeline_dir: Path, tmp_path: Path) -> None:
    state = folder_state(pipeline_dir, tmp_path)
    originals = list(state.model.transformer_blocks)
    stage = STAGES.get("prune")
    stage.run(state, stage.parse({"method": method, **SMALL[method]}, "prune"))
    origin = state.block_origin[BLOCKS]
    # PPCL's units of 2 keep (and train) their first block, which stands in for the unit's last
    kept = [0, 2] if method == "ppcl" else origin
    if method == "ppcl":
        assert origin == [1, 3]
        assert f"kept {kept} (reproducing {origin})" in state.notes[0]
    assert len(kept) == 2 and kept == sorted(kept) and state.model.config.num_layers == 2
    assert list(state.model.transformer_blocks) == [originals[i] for i in kept]
    assert state.notes[0].startswith(f"prune ({method}): {BLOCKS}: 2/4 kept {kept}")
    assert len(state.tables) == 1 and state.tables[0]["rows"]
    assert Path(state.figures[f"Depth pruning ({method})"]).read_bytes()[:4] == b"\x89PNG"
    assert state.timings["prune_s"] > 0


@needs_fmnist
def test_ppcl_trains_once_for_every_plug_ratio(pipeline_dir: Path, tmp_path: Path) -> None:
    stage = STAGES.get("prune")
    runs = []
    for plug in (0.5, 0.25):  # the same settings but plug: the second run reuses the first run's training
        state = folder_state(pipeline_dir, tmp_path)
        originals = list(state.model.transformer_blocks)
        stage.run(state, stage.parse({"method": "ppcl", **SMALL["ppcl"], "plug": plug}, "prune"))
        runs.append((state, originals))
    (full, _), (quarter, originals) = runs
    assert len(list((tmp_path / "ppcl-runs").iterdir())) == 1
    assert not any("reused" in note for note in full.notes) and any("reused" in note for note in quarter.notes)
    assert full.model.config.num_layers == 2 and quarter.model.config.num_layers == 3
    # units [0-1] and [2-3] (students from their first block): one is plugged, the other keeps both blocks
    kept = [originals.index(block) for block in quarter.model.transformer_blocks]
    assert (kept, quarter.block_origin[BLOCKS]) in (([0, 2, 3], [1, 2, 3]), ([0, 1, 2], [0, 1, 3]))
    assert "1 of 2 trained units plugged in" in quarter.notes[-1] and "1 blocks removed (plug 0.25)" in quarter.notes[-1]


def test_training_methods_sample_the_reference_outside_the_zoo(pipeline_dir: Path, tmp_path: Path) -> None:
    """Without a dataset (default ``data: auto`` on a model that is not the zoo's), TinyFusion trains on samples of
    the unpruned reference; a following distill stage with the same settings reuses them."""
    state = folder_state(pipeline_dir, tmp_path)
    stage = STAGES.get("prune")
    data = {"source": "auto", "images": 4}
    tinyfusion = {k: v for k, v in SMALL["tinyfusion"].items() if k != "data"}
    stage.run(state, stage.parse({"method": "tinyfusion", **tinyfusion, "data": data}, "prune"))
    assert "tinyfusion data: teacher samples (data-free): 4 clean latents" in state.notes[-1]
    assert "4 drawn now" in state.notes[-1]
    STAGES.get("distill").run(state, STAGES.get("distill").parse({"steps": 1, "batch_size": 4, "data": data}, "d"))
    assert "data: teacher samples (data-free)" in state.notes[-1] and "all reused from the cache" in state.notes[-1]
    assert len(list((tmp_path / "distill-data").iterdir())) == 1


def test_tinyfusion_on_a_text_model_trains_on_its_samples_for_the_prompts(tmp_path: Path) -> None:
    """A bare PixArt folder (MiniLM-width captions): prompts go to the sampler and the trainer as strings."""
    from tests.conftest import tiny_pixart

    tiny_pixart(layers=4).save_pretrained(tmp_path / "pixart")
    state = folder_state(tmp_path / "pixart", tmp_path)
    stage = STAGES.get("prune")
    tinyfusion = {k: v for k, v in SMALL["tinyfusion"].items() if k != "data"}
    data = {"source": "teacher", "images": 4, "steps": 2}
    stage.run(state, stage.parse({"method": "tinyfusion", **tinyfusion, "data": data}, "prune"))
    assert state.model.config.num_layers == 2
    assert "teacher samples (data-free): 4 clean latents of the uncompressed model for the text conditions of " \
           "fmnist-captions.jsonl" in state.notes[-1]


def test_pruning_twice_maps_blocks_to_the_reference(pipeline_dir: Path, tmp_path: Path) -> None:
    state = folder_state(pipeline_dir, tmp_path)
    stage = STAGES.get("prune")
    config = stage.parse({"method": "block_influence", **SMALL["block_influence"]}, "prune")
    stage.run(state, config)
    first = list(state.block_origin[BLOCKS])
    blocks = list(state.model.transformer_blocks)
    stage.run(state, config)
    (survivor,) = state.model.transformer_blocks
    assert state.block_origin[BLOCKS] == [first[blocks.index(survivor)]]


def test_prune_after_quantize_is_refused(pipeline_dir: Path, tmp_path: Path) -> None:
    state = folder_state(pipeline_dir, tmp_path)
    state.quant_specs = {"transformer_blocks.0.attn1.to_q": object()}
    stage = STAGES.get("prune")
    with pytest.raises(ConfigError, match="before quantize"):
        stage.run(state, stage.parse({"method": "block_influence"}, "prune"))
    assert len(state.model.transformer_blocks) == 4


def _training_samples(recipe) -> int:
    """Samples the recipe's stages train on (searches, probes, Taylor batches and distillation)."""
    total = 0
    for stage in recipe.stages:
        config = stage.config
        if stage.name == "distill":
            total += config.steps * config.batch_size
        elif stage.name == "prune_width" and config.importance == "taylor":
            total += config.batches * config.batch_size
        elif stage.name == "prune" and config.method == "tinyfusion":
            total += config.options.steps * config.options.batch_size
        elif stage.name == "prune" and config.method == "ppcl":
            total += (config.options.probe_batches + config.options.steps) * config.options.batch_size
    return total


@pytest.mark.parametrize("name", ["tinyfusion-50", "ppcl-50", "ppcl-33", "blockinfluence-50", "blockinfluence-33",
                                  "width-30", "width-30-magnitude",
                                  "prune-distill-quantize"])
def test_structural_recipes_share_one_budget_under_a_tenth_of_reference_training(name: str) -> None:
    from compressdit.recipe import load_recipe

    # flux-fmnist trained 1500 x 256 samples, dit-fmnist 2000 x 256: 10% of the smaller is 38,400
    assert _training_samples(load_recipe(name)) == (37_888 if name == "width-30-magnitude" else 38_400)
