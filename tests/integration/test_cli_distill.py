"""``compressdit distill`` on bad inputs (one ``error:`` line, exit 2, nothing written) and its happy path."""

from __future__ import annotations

import copy
import json
import shutil
import textwrap

import pytest
import torch

from compressdit.io.sources import load_source
from compressdit.models import ADAPTERS
from compressdit.prune.depth import remove_blocks
from compressdit.zoo.data import fmnist_dir
from tests.conftest import save_dit_pipeline, tiny_pixart
from tests.integration.test_cli_errors import (assert_nothing_written, assert_one_line_error, offline_cli_environment,
                                               run_main)

torch.set_num_threads(1)
needs_fmnist = pytest.mark.skipif(not (fmnist_dir() / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
SMALL = ["--steps", "2", "--batch-size", "4", "--data", "fmnist", "--images", "16", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with offline_cli_environment(tmp_path_factory.mktemp("env")) as tmp:
        yield tmp


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A 3-block teacher pipeline, a student pipeline without its block 1, and a PixArt model folder."""
    root = tmp_path_factory.mktemp("kd")
    teacher = save_dit_pipeline(root / "teacher", layers=3)
    student = root / "student"
    shutil.copytree(teacher, student)
    shutil.rmtree(student / "transformer")
    pruned = remove_blocks(copy.deepcopy(load_source(str(teacher)).transformer), ADAPTERS.get("dit"),
                           {"transformer_blocks": [0, 2]})
    pruned.save_pretrained(student / "transformer")
    tiny_pixart().save_pretrained(root / "pixart")
    return {"teacher": teacher, "student": student, "pixart": root / "pixart"}


@pytest.mark.parametrize("student, teacher, needles", [
    ("missing", "teacher", ["does not exist", "missing"]),
    ("student", "missing", ["does not exist", "missing"]),
    ("pixart", "teacher", ["PixArtTransformer2DModel", "DiTTransformer2DModel", "one model family"]),
    ("teacher", "student", ["3 blocks", "only 2", "cannot be mapped"]),  # deeper student than teacher
])
def test_bad_inputs_fail_in_one_line(models, tmp_path, student, teacher, needles):
    paths = {**models, "missing": tmp_path / "missing"}
    result = run_main("distill", paths[student], "--teacher", paths[teacher], "--out", tmp_path / "out", *SMALL)
    assert result.code == 2
    assert_one_line_error(result, *needles)
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("layer_map, needles", [("0,x", ["--layer-map", "0,x"]),
                                                 ("0", ["1 teacher blocks", "2 blocks"])])
def test_bad_layer_map(models, tmp_path, layer_map, needles):
    result = run_main("distill", models["student"], "--teacher", models["teacher"], "--out", tmp_path / "out", *SMALL,
                      "--layer-map", layer_map)
    assert_one_line_error(result, *needles)
    assert_nothing_written(tmp_path / "out")


def test_taken_output_needs_overwrite(models, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_main("distill", models["student"], "--teacher", models["teacher"], "--out", tmp_path / "out", *SMALL)
    assert_one_line_error(result, "not empty", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


@needs_fmnist
def test_distill_writes_a_stock_pipeline(models, tmp_path):
    from diffusers import DiTPipeline

    out = tmp_path / "out"
    result = run_main("distill", models["student"], "--teacher", models["teacher"], "--out", out, *SMALL, "--json",
                      "--layer-map", "0,2")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["completed"] and summary["steps"] == 2 and summary["layer_map"] == [[0, 0], [1, 2]]
    pipe = DiTPipeline.from_pretrained(out)  # stock diffusers, no compressdit involved
    assert pipe.transformer.config.num_layers == 2 and len(pipe.transformer.transformer_blocks) == 2
    assert sorted(p.name for p in out.iterdir()) == ["compressdit_distill.json", "model_index.json", "scheduler",
                                                     "transformer", "vae"]
    student = load_source(str(models["student"])).transformer
    changed = [not torch.equal(a.half(), b) for a, b in zip(student.state_dict().values(),
                                                            pipe.transformer.state_dict().values())]
    assert any(changed)


@needs_fmnist
def test_recipe_with_distill_stage_runs_through_the_pipeline(models, tmp_path):
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(textwrap.dedent("""
        version: 1
        name: kd
        stages:
          - distill: {steps: 2, batch_size: 4, data: {source: fmnist, images: 16}, feature_weight: 0.0}
        """))
    out = tmp_path / "out"
    result = run_main("run", recipe, "--model", models["teacher"], "--out", out, "--quiet", "--json")
    assert result.code == 0, result.stderr
    assert "distill_s" in json.loads(result.stdout)["timings"]
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").exists()


def test_distill_without_a_dataset_samples_the_teacher(models, tmp_path):
    result = run_main("distill", models["student"], "--teacher", models["teacher"], "--out", tmp_path / "out",
                      "--steps", "1", "--batch-size", "4", "--data", "teacher", "--images", "4", "--json")
    assert result.code == 0, result.stderr
    note = json.loads(result.stdout)["data_note"]
    assert note.startswith("teacher samples (data-free): 4 clean latents") and "4 drawn now" in note
