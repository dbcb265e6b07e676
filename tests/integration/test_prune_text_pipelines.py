"""``compressdit prune`` on real text-to-image pipelines (tiny PixArt-alpha with T5, FLUX with CLIP + T5; random
weights, built offline): the prompts of the data-free teacher samples, of the search and of the distillation go
through the pipeline's own ``encode_prompt`` (not MiniLM); the output reloads with stock
``DiffusionPipeline.from_pretrained`` and generates. ``--data images:PATH`` trains on captioned images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compressdit.recipe import RECIPES_DIR
from tests.integration.test_cli_errors import run_main
# offline_env / cache: the same autouse fixtures (offline CLI environment, a fresh compressdit cache per test)
from tests.integration.test_real_pipelines import _generate, _prompt_cache, cache, offline_env  # noqa: F401

torch.set_num_threads(1)

TEACHER = {"source": "teacher", "images": 4, "steps": 2, "batch_size": 4}  # 4 samples x 2 steps


def _small_recipe(name: str, path: Path, data: dict | None = None) -> Path:
    """The shipped recipe with the fewest steps and batches, on ``data`` (default: 4 teacher samples), no evaluate."""
    recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    shrink = {"block_influence": {"samples": 2, "steps": 2},
              "tinyfusion": {"steps": 1, "batch_size": 2, "mask_draws": 2},
              "ppcl": {"probe_batches": 1, "simulation_batches": 1, "steps": 1, "batch_size": 2, "warmup": 0},
              "prune_width": {"batches": 1, "batch_size": 2},
              "distill": {"steps": 1, "batch_size": 2, "warmup": 0}}
    for stage in recipe["stages"]:
        (stage_name, config), = stage.items()
        config.update(shrink.get(config.get("method", stage_name), {}))
        if "data" in config or stage_name == "prune_width":
            config["data"] = data or TEACHER
    recipe["stages"] = [s for s in recipe["stages"] if "evaluate" not in s]
    path.write_text(yaml.safe_dump(recipe))
    return path


def _prune(model: Path, recipe: Path, out: Path, *flags) -> dict:
    result = run_main("prune", model, "--recipe", recipe, "--out", out, "--json", *flags)
    assert result.code == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize(("family", "recipe"), [("pixart", "blockinfluence-50"), ("pixart", "ppcl-50"),
                                                  ("sd3", "ppcl-50"), ("flux", "width-30")])
def test_prune_a_text_pipeline_through_its_own_text_encoders(family, recipe, text_pipeline_dir, tmp_path, cache):
    folder = text_pipeline_dir(family)
    summary = _prune(folder, _small_recipe(recipe, tmp_path / f"{recipe}.yaml"), tmp_path / "out")
    (teacher,) = sorted((cache / "distill-data").glob("teacher-*"))  # data-free: the pipeline's own samples
    assert [p.name for p in teacher.glob("part-*")] == ["part-0000000-0000004.safetensors"]
    assert _prompt_cache(cache)  # prompts embedded by the pipeline's T5 / CLIP, not MiniLM
    before = json.loads((folder / "transformer" / "config.json").read_text())
    after = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    if recipe != "width-30":  # depth: half of the blocks (SD3's last block, without text output, always stays)
        assert after["num_layers"] == sum(map(len, summary["kept_blocks"].values()))
        assert after["num_layers"] == (before["num_layers"] // 2 if family == "pixart" else before["num_layers"])
    else:
        from safetensors.torch import load_file

        def parameters(path: Path) -> int:
            return sum(t.numel() for t in load_file(str(path / "transformer" / "diffusion_pytorch_model.safetensors"))
                       .values())

        assert parameters(tmp_path / "out") < parameters(folder)
    images = _generate(tmp_path / "out", family)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()


def test_prune_a_text_pipeline_on_captioned_images(text_pipeline_dir, tmp_path, cache):
    from PIL import Image

    images = tmp_path / "shirts"
    images.mkdir()
    gen = torch.Generator().manual_seed(0)
    captions = ["a red shirt", "a blue shirt", "a red shirt"]
    for i, caption in enumerate(captions):
        pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(images / f"{i}.png")
    (images / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n"
                                                   for i, c in enumerate(captions)))
    recipe = _small_recipe("tinyfusion-50", tmp_path / "tinyfusion-50.yaml")
    out = tmp_path / "out"
    _prune(text_pipeline_dir("pixart"), recipe, out, "--data", f"images:{images}")
    (encoded,) = sorted((cache / "distill-data").glob("images-*"))  # no teacher samples
    assert json.loads((encoded / "conditions.json").read_text()) == captions
    assert not list((cache / "distill-data").glob("teacher-*"))
    assert len(_prompt_cache(cache)) == 3  # two captions and the null prompt, through the pipeline's T5
    assert torch.isfinite(_generate(out, "pixart")).all()


def test_distill_a_text_pipeline_from_its_teacher(text_pipeline_dir, tmp_path, cache):
    folder = text_pipeline_dir("pixart")
    result = run_main("distill", folder, "--teacher", folder, "--out", tmp_path / "out", "--steps", "1",
                      "--batch-size", "2", "--data", "teacher", "--images", "2", "--json")
    assert result.code == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["completed"]
    assert sorted((cache / "distill-data").glob("teacher-*")) and _prompt_cache(cache)
    assert torch.isfinite(_generate(tmp_path / "out", "pixart")).all()


def test_distill_bare_transformer_folders_with_text_encoder(text_pipeline_dir, tmp_path, cache):
    folder = text_pipeline_dir("pixart")
    bare = folder / "transformer"  # no text encoder of its own: MiniLM (384-d) would not fit the 32-d captions
    args = ["distill", bare, "--teacher", bare, "--steps", "1", "--batch-size", "2", "--data", "teacher",
            "--images", "2", "--json"]
    without = run_main(*args, "--out", tmp_path / "minilm")
    assert without.code != 0 and "--text-encoder" in without.stderr and not (tmp_path / "minilm").exists()
    result = run_main(*args, "--out", tmp_path / "out", "--text-encoder", folder)
    assert result.code == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["completed"] and _prompt_cache(cache)
