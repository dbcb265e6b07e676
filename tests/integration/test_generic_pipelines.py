"""``compressdit quantize`` with calibrated recipes on pipelines of families compressdit has no adapter for (tiny
AuraFlow with UMT5, Chroma with T5; random weights, built offline): the calibration samples through the stock
pipeline's ``__call__``, the output reloads with stock ``DiffusionPipeline.from_pretrained`` and generates close to
the float pipeline at the same seeds. What cannot run (evaluation, a bare transformer folder, ``size`` for an adapter
family) stops with one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.integration.test_cli_errors import ROOT, assert_nothing_written, assert_one_line_error, run_main
from tests.integration.test_real_pipelines import cache, offline_env  # noqa: F401  (the same fixtures)

torch.set_num_threads(1)


def _recipe(tmp_path: Path, evaluate: bool = False, size: int | None = 64, name: str = "w8a8") -> Path:
    """A shipped recipe with a 2-prompt, 2-step calibration at ``size`` px (and a 4-sample evaluation)."""
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    for stage in recipe["stages"]:
        if "calibrate" in stage:
            stage["calibrate"].update(samples=2, steps=2, batch_size=2, **({"size": size} if size else {}))
        if "evaluate" in stage:
            stage["evaluate"].update(samples=4, steps=3, fidelity_samples=2, effnet=False)
    if not evaluate:
        recipe["stages"] = [s for s in recipe["stages"] if "evaluate" not in s]
    path = tmp_path / f"{name}-small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _latents(folder: Path) -> torch.Tensor:
    import compressdit  # noqa: F401  (registers the quantizer backend, as a user's import does)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a red fox", "a grey cat"], num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
                output_type="latent", generator=[torch.Generator().manual_seed(i) for i in range(2)]).images


@pytest.mark.parametrize("family", ["auraflow", "chroma"])
def test_calibrated_w8a8_through_the_pipelines_own_call(family, text_pipeline_dir, tmp_path, cache):
    folder = text_pipeline_dir(family)
    result = run_main("quantize", folder, "--recipe", _recipe(tmp_path), "--no-eval", "--out", tmp_path / "out",
                      "--json")
    assert result.code == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["quantized_modules"] > 0 and "calibrate_s" in summary["timings"]
    stats = sorted((cache / "calibration").glob("*.safetensors"))
    assert len(stats) == 1
    with safe_open(str(stats[0]), "pt") as handle:
        assert len(json.loads(handle.metadata()["timesteps"])) == 2  # one entry per denoising step, not per call
        absmax = [handle.get_tensor(k) for k in handle.keys() if not k.startswith("meansq")]
    assert absmax and all(t.shape[0] == 2 and (t > 0).any(dim=1).all() for t in absmax)  # every layer, each step
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressdit"
    reference, quantized = _latents(folder), _latents(tmp_path / "out")
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert torch.isfinite(quantized).all() and 0 < error < 0.05


def test_the_report_of_a_driven_pipeline(text_pipeline_dir, tmp_path):
    """The evaluate stage samples every column through the stock pipeline at the calibration's size: fidelity
    to the reference at equal seeds, per-step error and per-layer SQNR on the reference's replayed calls."""
    result = run_main("quantize", text_pipeline_dir("chroma"), "--recipe", _recipe(tmp_path, evaluate=True),
                      "--out", tmp_path / "out", "--json", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    assert report["columns"] == ["candidate", "reference", "baseline"]
    metrics = {m["name"]: m["values"] for m in report["metrics"]}
    psnr = metrics["PSNR vs reference (same seeds)"]
    assert psnr["reference"] is None and 20 < psnr["candidate"] < 200 and psnr["baseline"] > 20
    assert not any("FMNIST" in name or "accuracy" in name for name in metrics)  # not the zoo's metrics
    assert (tmp_path / "out" / "report" / "samples_candidate.png").exists()
    errors = report["per_timestep_error"]
    assert len(errors["timesteps"]) == 3 and all(0 < e < 0.05 for e in errors["series"]["candidate"])
    sqnr = report["layer_sqnr"]
    assert sqnr["layers"] and all(v is None or v > 20 for v in sqnr["series"]["candidate"])


def test_a_video_pipeline_with_call_keywords(text_pipeline_dir, tmp_path):
    """LTX-Video: ``call`` passes the frame count and text length the tiny pipeline needs; the report takes the
    frames as images. An unknown keyword is one line naming the ones the pipeline takes."""
    recipe = yaml.safe_load(_recipe(tmp_path, evaluate=True, size=32).read_text())
    for stage in recipe["stages"]:
        for name in ("calibrate", "evaluate"):
            if name in stage:
                stage[name]["call"] = {"num_frames": 9, "max_sequence_length": 16}
    path = tmp_path / "ltx.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_main("quantize", text_pipeline_dir("ltx"), "--recipe", path, "--out", tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    psnr = {m["name"]: m["values"] for m in report["metrics"]}["PSNR vs reference (same seeds)"]
    assert psnr["candidate"] > 20
    recipe["stages"][0]["calibrate"]["call"] = {"frames": 9}
    path.write_text(yaml.safe_dump(recipe))
    result = run_main("quantize", text_pipeline_dir("ltx"), "--recipe", path, "--out", tmp_path / "no")
    assert_one_line_error(result, "'frames'", "LTXPipeline", "num_frames")
    assert_nothing_written(tmp_path / "no")


def test_what_a_driven_pipeline_cannot_run_stops_first(text_pipeline_dir, tmp_path, cache):
    folder = text_pipeline_dir("auraflow")
    result = run_main("quantize", folder, "--recipe", ROOT / "recipes" / "tinyfusion-50.yaml", "--out", tmp_path / "no")
    assert_one_line_error(result, "AuraFlowTransformer2DModel", "own __call__", "pruning")
    assert_nothing_written(tmp_path / "no")
    result = run_main("quantize", folder, "--recipe", _recipe(tmp_path, name="w4a8"), "--no-eval",
                      "--out", tmp_path / "no")  # ViDiT-Q-MP's probes: after the calibration, one line all the same
    assert_one_line_error(result, "AuraFlowTransformer2DModel", "mixed precision")
    assert_nothing_written(tmp_path / "no")
    result = run_main("quantize", folder / "transformer", "--recipe", _recipe(tmp_path, size=None), "--no-eval",
                      "--out", tmp_path / "no")
    assert_one_line_error(result, "pipeline folder", "rtn-w8a8")
    assert_nothing_written(tmp_path / "no")


def test_size_is_for_driven_pipelines_only(text_pipeline_dir, tmp_path):
    result = run_main("quantize", text_pipeline_dir("pixart"), "--recipe", _recipe(tmp_path), "--no-eval",
                      "--out", tmp_path / "no")
    assert_one_line_error(result, "calibrate.size", "PixArtTransformer2DModel")
    assert_nothing_written(tmp_path / "no")


def test_evaluate_command_on_a_driven_pipeline(text_pipeline_dir, tmp_path):
    folder = text_pipeline_dir("auraflow")
    result = run_main("quantize", folder, "--recipe", "rtn-w8a8", "--no-eval", "--out", tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    result = run_main("evaluate", tmp_path / "out", "--reference", folder, "--samples", 2, "--steps", 2,
                      "--size", 64, "--json")
    assert result.code == 0, result.stderr[-3000:]
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["PSNR vs reference (same seeds)"]["candidate"] > 20
    result = run_main("evaluate", tmp_path / "out", "--reference", "zoo:dit-fmnist", "--samples", 2, "--size", 64)
    assert_one_line_error(result, "zoo:dit-fmnist", "DiTTransformer2DModel", "--reference")  # not its family


def _family_recipe(tmp_path: Path, family: str, name: str, evaluate: bool = False) -> Path:
    """``_recipe`` at the family's tiny size and ``call`` keywords, evaluating 2 samples of 2 steps; int4 groups of
    32 (the tiny widths)."""
    from tests.tiny_driven_pipelines import CALLS

    size, call = CALLS.get(family, (64, {}))
    recipe = yaml.safe_load(_recipe(tmp_path, evaluate=evaluate, size=size, name=name).read_text())
    for stage in recipe["stages"]:
        for key in ("calibrate", "evaluate"):
            if key in stage and call:
                stage[key]["call"] = call
        if "evaluate" in stage:
            stage["evaluate"].update(samples=2, steps=2)
        for rule in stage.get("quantize", {}).get("rules", []):
            if (rule["spec"] or {}).get("group_size"):
                rule["spec"]["group_size"] = 32
    path = tmp_path / f"{family}-{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _family_latents(folder: Path, family: str) -> torch.Tensor:
    """Latents of the stock pipeline reloaded from ``folder``, called as a user of that family calls it."""
    import compressdit  # noqa: F401  (registers the quantizer backend, as a user's import does)
    from diffusers import DiffusionPipeline

    from compressdit.models.pipeline_calls import guidance_call, size_options
    from tests.tiny_driven_pipelines import CALLS

    size, call = CALLS.get(family, (64, {}))
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(["a red fox", "a grey cat"], num_inference_steps=2, output_type="latent",
                  generator=[torch.Generator().manual_seed(i) for i in range(2)], **size_options(type(pipe), size),
                  **call, **guidance_call(type(pipe)).options(4.0, 2))
    return result.frames if hasattr(result, "frames") else result.images


@pytest.mark.parametrize("family", ["qwenimage", "sana", "hunyuandit", "mochi"])
def test_gptq_on_family_pipelines_reloads_in_stock_diffusers(family, text_pipeline_dir, tmp_path):
    """Qwen-Image (true CFG), Sana (resolution binning, DC-AE), HunyuanDiT (positional timestep), Mochi (video):
    GPTQ calibrated through each pipeline's own ``__call__``, saved, reloaded by stock diffusers, close to float."""
    folder = text_pipeline_dir(family)
    result = run_main("quantize", folder, "--recipe", _family_recipe(tmp_path, family, "gptq-w4a16"), "--no-eval",
                      "--out", tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    reference, quantized = _family_latents(folder, family), _family_latents(tmp_path / "out", family)
    error = ((quantized - reference).norm() / reference.norm()).item()
    assert torch.isfinite(quantized).all() and 0 < error < 0.2


def test_the_report_of_qwen_image(text_pipeline_dir, tmp_path):
    """W8A8 with its report on Qwen-Image: every column guided by true CFG (two transformer calls a step, both
    replayed for the per-step error)."""
    result = run_main("quantize", text_pipeline_dir("qwenimage"), "--recipe",
                      _family_recipe(tmp_path, "qwenimage", "w8a8", evaluate=True), "--out", tmp_path / "out",
                      "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    psnr = {m["name"]: m["values"] for m in report["metrics"]}["PSNR vs reference (same seeds)"]
    assert 20 < psnr["candidate"] < 200 and psnr["baseline"] > 20
    errors = report["per_timestep_error"]
    assert len(errors["timesteps"]) == 2 and all(0 < e < 0.1 for e in errors["series"]["candidate"])


def test_a_report_whose_reference_decodes_constant_images(text_pipeline_dir, tmp_path):
    """Allegro's VAE decodes only tiles of 24 frames and its sample size: below that its frames are constant, so
    the report leaves the image metrics out with a note and keeps the transformer-output ones."""
    result = run_main("quantize", text_pipeline_dir("allegro"), "--recipe",
                      _family_recipe(tmp_path, "allegro", "w8a8", evaluate=True), "--out", tmp_path / "out", "--quiet")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    psnr = {m["name"]: m["values"] for m in report["metrics"]}["PSNR vs reference (same seeds)"]
    assert set(psnr.values()) == {None}
    assert any("AllegroPipeline decoded constant images" in note for note in report["notes"])
    assert all(0 < e < 0.1 for e in report["per_timestep_error"]["series"]["candidate"])
