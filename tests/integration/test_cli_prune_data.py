"""``compressdit prune`` on a class-conditional DiT pipeline that is not the zoo's: data-free by default, or on a
folder of the user's images with ``--data images:PATH``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from compressdit.recipe import RECIPES_DIR
from tests.conftest import tiny_dit
from tests.integration.test_cli_errors import assert_one_line_error, offline_cli_environment, run_main

torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with offline_cli_environment(tmp_path_factory.mktemp("env")) as tmp:
        yield tmp


@pytest.fixture(scope="module")
def foreign_pipeline(tmp_path_factory) -> Path:
    """A stock ``DiTPipeline``: 4-block random DiT, an RGB ``AutoencoderKL`` (16x16 pixels -> 4x8x8), DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=16, scaling_factor=0.5).eval()
    path = tmp_path_factory.mktemp("foreign") / "dit-pipe"
    DiTPipeline(transformer=tiny_dit(layers=4), vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000)) \
        .save_pretrained(path)
    return path


def _small_recipe(name: str, path: Path) -> Path:
    """The shipped recipe with tiny step counts; its ``data`` keys keep the shipped source (``auto``), for 64
    latents instead of the default 1024."""
    data = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    shrink = {"block_influence": {"samples": 2, "steps": 2}, "tinyfusion": {"steps": 2, "batch_size": 4},
              "distill": {"steps": 2, "batch_size": 4, "warmup": 1}}
    for stage in data["stages"]:
        (stage_name, config), = stage.items()
        config.update(shrink.get(config.get("method", stage_name), {}))
        if config.get("data") == "auto":
            config["data"] = {"source": "auto", "images": 64}
    data["stages"] = [s for s in data["stages"] if "evaluate" not in s]
    path.write_text(yaml.safe_dump(data))
    return path


def _cached(offline_env: Path, prefix: str) -> list[Path]:
    return sorted((offline_env / "cache" / "distill-data").glob(f"{prefix}-*"))


def test_prune_is_data_free_by_default(foreign_pipeline, tmp_path, offline_env):
    from diffusers import DiTPipeline

    recipe = _small_recipe("blockinfluence-50", tmp_path / "blockinfluence-50.yaml")
    out = tmp_path / "out"
    result = run_main("prune", foreign_pipeline, "--recipe", recipe, "--out", out, "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["kept_blocks"]["transformer_blocks"].__len__() == 2
    assert DiTPipeline.from_pretrained(out).transformer.config.num_layers == 2  # stock diffusers reload
    (teacher,) = _cached(offline_env, "teacher")  # the reference's own samples
    assert [p.name for p in teacher.glob("part-*")] == ["part-0000000-0000064.safetensors"]
    assert not _cached(offline_env, "fmnist")


def test_prune_on_a_folder_of_images(foreign_pipeline, tmp_path, offline_env):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for label in ("cat", "dog"):
        (tmp_path / "pets" / label).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(24, 20, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "pets" / label / f"{i}.png")
    recipe = _small_recipe("tinyfusion-50", tmp_path / "tinyfusion-50.yaml")
    out = tmp_path / "out"
    result = run_main("prune", foreign_pipeline, "--recipe", recipe, "--out", out, "--json", "--data",
                      f"images:{tmp_path / 'pets'}")
    assert result.code == 0, result.stderr
    saved = yaml.safe_load((out / "compressdit_recipe.yaml").read_text())
    prune, distill = (config for stage in saved["stages"] for config in stage.values())
    assert prune["data"]["path"] == distill["data"]["path"] == str(tmp_path / "pets")
    (images,) = _cached(offline_env, "images")  # encoded once, shared by the search and the distillation
    assert (images / "conditions.json").read_text() == "[0, 0, 0, 1, 1, 1]"


def test_bad_data_option_is_one_line(foreign_pipeline, tmp_path):
    result = run_main("prune", foreign_pipeline, "--recipe", "blockinfluence-50", "--out", tmp_path / "out",
                      "--data", "imagenet")
    assert_one_line_error(result, "--data.source", "unknown data source 'imagenet'", "teacher")
