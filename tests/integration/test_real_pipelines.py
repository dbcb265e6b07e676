"""``compressdit quantize`` on real text-to-image pipelines with their own text encoders (tiny PixArt-alpha with T5,
SD3 with CLIP + CLIP + T5, FLUX with CLIP + T5; random weights, built offline): calibration goes through the
pipeline's own ``encode_prompt``; the output reloads with stock ``DiffusionPipeline.from_pretrained`` and generates.
A bare transformer folder calibrates with ``--text-encoder`` or ``--embeddings``; ``--calib`` reads parquet / csv."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import fresh_cache
from tests.integration.test_cli_errors import (ROOT, assert_nothing_written, assert_one_line_error,
                                               offline_cli_environment, run_main)

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with offline_cli_environment(tmp_path_factory.mktemp("env")) as tmp:
        yield tmp


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh compressdit cache per test: every test calibrates (and encodes prompts) itself."""
    monkeypatch.setenv("COMPRESSDIT_CACHE", str(fresh_cache(tmp_path / "cache")))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def small_w8a8(tmp_path_factory) -> Path:
    """The shipped w8a8 recipe (calibrate -> ViDiT-Q W8A8) with a 4-prompt, 2-step calibration."""
    recipe = yaml.safe_load((ROOT / "recipes" / "w8a8.yaml").read_text())
    for stage in recipe["stages"]:
        if "calibrate" in stage:
            stage["calibrate"].update(samples=4, steps=2, batch_size=4)
    path = tmp_path_factory.mktemp("recipes") / "w8a8-small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _quantize(model, out, recipe, *flags):
    result = run_main("quantize", model, "--recipe", recipe, "--no-eval", "--out", out, "--json", *flags)
    assert result.code == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def _generate(folder: Path, family: str) -> torch.Tensor:
    import compressdit  # noqa: F401  (registers the quantizer backend, as a user's import does)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    extra = {"use_resolution_binning": False} if family == "pixart" else {}
    return pipe("a red fox", num_inference_steps=2, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0), **extra).images


def _prompt_cache(cache: Path) -> list[Path]:
    return sorted((cache / "prompt-embeddings").rglob("*.safetensors"))


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux"])
def test_quantize_a_pipeline_through_its_own_text_encoders(family, text_pipeline_dir, small_w8a8, tmp_path, cache):
    folder = text_pipeline_dir(family)
    summary = _quantize(folder, tmp_path / "out", small_w8a8)
    assert summary["quantized_modules"] > 0 and "calibrate_s" in summary["timings"]
    assert len(_prompt_cache(cache)) == 5  # 4 calibration captions and the null prompt, encoded by the pipeline
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressdit"
    assert (tmp_path / "out" / "text_encoder").is_dir()  # the pipeline's other parts come along
    images = _generate(tmp_path / "out", family)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    if family == "pixart":  # a second run finds every prompt embedding in the cache and rewrites none
        cached = {p: p.stat().st_mtime_ns for p in _prompt_cache(cache)}
        assert cached
        _quantize(folder, tmp_path / "again", small_w8a8, "--calib", "fmnist-captions")
        assert {p: p.stat().st_mtime_ns for p in _prompt_cache(cache)} == cached


def _bare(folder: Path, target: Path) -> Path:
    return Path(shutil.copytree(folder / "transformer", target))


def test_bare_transformer_calibrates_with_text_encoder_flag(text_pipeline_dir, small_w8a8, tmp_path):
    from diffusers import SD3Transformer2DModel

    folder = text_pipeline_dir("sd3")
    bare = _bare(folder, tmp_path / "sd3-bare")
    result = run_main("quantize", bare, "--recipe", small_w8a8, "--no-eval", "--out", tmp_path / "no", "--quiet")
    assert_one_line_error(result, "width 32", "--text-encoder", "--embeddings")
    assert_nothing_written(tmp_path / "no")
    summary = _quantize(bare, tmp_path / "out", small_w8a8, "--text-encoder", folder)
    assert summary["quantized_modules"] > 0
    import compressdit  # noqa: F401

    model = SD3Transformer2DModel.from_pretrained(tmp_path / "out")  # a bare folder in, a bare folder out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["quant_method"] \
        == "compressdit"
    assert any(type(m).__name__ == "QuantLinear" for m in model.modules())


def _write_calib(path: Path, prompts: list[str]) -> Path:
    import datasets

    data = datasets.Dataset.from_dict({"prompt": prompts})
    (data.to_parquet if path.suffix == ".parquet" else data.to_csv)(str(path))
    return path


def test_embeddings_file_and_parquet_calibration(text_pipeline_dir, small_w8a8, tmp_path):
    from compressdit.models import ADAPTERS
    from compressdit.models.prompt_encoders import PipelinePromptEncoder, save_prompt_embeddings

    folder = text_pipeline_dir("flux")
    prompts = ["a red fox", "a bag on a table", "a blue boat"]
    calib = _write_calib(tmp_path / "prompts.parquet", prompts)
    everything = prompts + [""]
    encoder = PipelinePromptEncoder(folder, ADAPTERS.get("flux"))
    path = save_prompt_embeddings(tmp_path / "flux-prompts.safetensors", everything, encoder.resolve(everything))
    bare = _bare(folder, tmp_path / "flux-bare")
    summary = _quantize(bare, tmp_path / "out", small_w8a8, "--embeddings", path, "--calib", calib)
    assert summary["quantized_modules"] > 0
    missing = run_main("quantize", bare, "--recipe", small_w8a8, "--no-eval", "--out", tmp_path / "no", "--quiet",
                       "--embeddings", path)  # the default caption set is not in the file
    assert_one_line_error(missing, "is not in", "flux-prompts.safetensors", "--text-encoder")
    assert_nothing_written(tmp_path / "no")


def test_csv_calibration_set_on_a_pipeline(text_pipeline_dir, small_w8a8, tmp_path):
    calib = _write_calib(tmp_path / "prompts.csv", ["a cat, sitting", "a dog"])
    summary = _quantize(text_pipeline_dir("pixart"), tmp_path / "out", small_w8a8, "--calib", calib)
    assert summary["quantized_modules"] > 0


def test_flag_errors_are_one_line(text_pipeline_dir, dit_pipeline_dir, small_w8a8, tmp_path):
    folder = text_pipeline_dir("pixart")
    both = run_main("quantize", folder, "--recipe", small_w8a8, "--out", tmp_path / "a", "--no-eval",
                    "--text-encoder", folder, "--embeddings", tmp_path / "e.safetensors")
    assert_one_line_error(both, "--text-encoder", "--embeddings", "not both")
    not_a_pipeline = run_main("quantize", folder, "--recipe", small_w8a8, "--out", tmp_path / "b", "--no-eval",
                              "--text-encoder", folder / "transformer")
    assert_one_line_error(not_a_pipeline, "--text-encoder", "not a diffusers pipeline folder with text encoders")
    class_model = run_main("quantize", dit_pipeline_dir, "--recipe", small_w8a8, "--out", tmp_path / "c",
                           "--no-eval", "--text-encoder", folder)
    assert_one_line_error(class_model, "--text-encoder", "class-conditioned")
    missing = run_main("quantize", folder, "--recipe", small_w8a8, "--out", tmp_path / "d", "--no-eval",
                       "--text-encoder", tmp_path / "nowhere")
    assert_one_line_error(missing, "--text-encoder", "does not exist")
    for name in "abcd":
        assert_nothing_written(tmp_path / name)
