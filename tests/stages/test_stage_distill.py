"""Tests for the ``distill`` stage: recipe parsing, a run on real Fashion-MNIST latents, resume, time cap."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from compressdit.errors import ConfigError, TrainingIncomplete
from compressdit.io.sources import load_source
from compressdit.models import ADAPTERS
from compressdit.prune.depth import remove_blocks
from compressdit.recipe import Recipe
from compressdit.stages import STAGES, PipelineState
from compressdit.stages.distill import DistillStageConfig
from compressdit.zoo.data import fmnist_dir
from tests.conftest import save_dit_pipeline

torch.set_num_threads(1)
DIT = ADAPTERS.get("dit")
needs_fmnist = pytest.mark.skipif(not (fmnist_dir() / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
SMALL = {"steps": 3, "batch_size": 4, "data": {"source": "fmnist", "images": 16}, "checkpoint_every": 2, "lr": 1e-3, "warmup": 1}


def test_recipe_parses_distill_stage():
    recipe = Recipe.from_dict({"version": 1, "name": "kd", "stages": [{"distill": {"steps": 10, "layer_map": [0, 2]}}]})
    config = recipe.stage("distill").config
    assert isinstance(config, DistillStageConfig) and config.steps == 10 and config.layer_map == [0, 2]
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(ConfigError, match="unknown key 'imgs'"):
        Recipe.from_dict({"version": 1, "name": "kd", "stages": [{"distill": {"imgs": 10}}]})
    with pytest.raises(ConfigError, match="data.images: must be positive"):
        DistillStageConfig.from_dict({"data": {"source": "fmnist", "images": 0}})
    with pytest.raises(ConfigError, match="unknown key 'images'"):  # the count lives in data
        DistillStageConfig.from_dict({"images": 16})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return save_dit_pipeline(tmp_path_factory.mktemp("distill") / "teacher", layers=3)


def _state(teacher_dir: Path, cache: Path) -> PipelineState:
    """The pipeline state after depth pruning removed block 1 of the 3-block reference."""
    source = load_source(str(teacher_dir))
    student = remove_blocks(copy.deepcopy(source.transformer), DIT, {"transformer_blocks": [0, 2]})
    return PipelineState(source=source, adapter=DIT, model=student, workdir=cache / "out",
                         reference_spec=str(teacher_dir), quiet=True, cache_dir=cache,
                         block_origin={"transformer_blocks": [0, 2]})


@needs_fmnist
def test_stage_distils_and_records(teacher_dir, tmp_path):
    state = _state(teacher_dir, tmp_path)
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    config = DistillStageConfig.from_dict(SMALL)
    STAGES.get("distill").run(state, config)
    assert any(not torch.equal(before[k], v) for k, v in state.model.state_dict().items())
    assert "3 steps x batch 4" in state.notes[-1] and "0<-0, 1<-2" in state.notes[-1]
    table = state.tables[-1]
    assert [row[0] for row in table["rows"]] == ["output", "feature", "data"]
    assert Path(state.figures["Distillation loss"]).read_bytes()[:4] == b"\x89PNG"
    assert state.timings["distill_s"] > 0
    assert len(list((tmp_path / "distill-data").glob("fmnist-latents-*-16.pt"))) == 1

    again = _state(teacher_dir, tmp_path)  # same student, teacher and settings: the finished run is reused
    STAGES.get("distill").run(again, config)
    assert all(torch.equal(a, b) for a, b in zip(state.model.state_dict().values(), again.model.state_dict().values()))


@needs_fmnist
def test_stage_time_cap_asks_to_rerun(teacher_dir, tmp_path):
    state = _state(teacher_dir, tmp_path)
    with pytest.raises(TrainingIncomplete, match="step 1/5 .* run the same command again"):
        STAGES.get("distill").run(state, DistillStageConfig.from_dict({**SMALL, "steps": 5, "max_minutes": 0.0}))


@needs_fmnist
def test_workdir_of_another_run_is_refused(teacher_dir, tmp_path):
    workdir = str(tmp_path / "work")
    STAGES.get("distill").run(_state(teacher_dir, tmp_path),
                              DistillStageConfig.from_dict({**SMALL, "steps": 1, "workdir": workdir}))
    with pytest.raises(ConfigError, match="holds the state of another distillation"):
        STAGES.get("distill").run(_state(teacher_dir, tmp_path),
                                  DistillStageConfig.from_dict({**SMALL, "steps": 2, "workdir": workdir}))


def test_stage_defaults_to_teacher_samples_outside_the_zoo(teacher_dir, tmp_path):
    """A model that is not the zoo's needs no dataset: the reference's own samples are the training data."""
    state = _state(teacher_dir, tmp_path)
    small = {k: v for k, v in SMALL.items() if k != "data"}
    config = DistillStageConfig.from_dict({**small, "data": {"source": "auto", "images": 4}})
    STAGES.get("distill").run(state, config)
    assert "data: teacher samples (data-free): 4 clean latents" in state.notes[-1]
    assert "4 samples x 20 steps = 80 denoising steps (x2 batch for guidance); 4 drawn now" in state.notes[-1]
    assert [p.name[:8] for p in (tmp_path / "distill-data").iterdir()] == ["teacher-"]
