"""``compressdit moe``: a tiny pipeline becomes a distilled MoE checkpoint that stock diffusers reloads (after
``import compressdit``); bad recipes are one ``error:`` line."""

from __future__ import annotations

import json

import pytest
import torch

from compressdit.zoo.data import fmnist_dir
from tests.integration.test_cli_errors import (assert_nothing_written, assert_one_line_error, offline_cli_environment,
                                               run_main, write_recipe)

torch.set_num_threads(1)
needs_fmnist = pytest.mark.skipif(not (fmnist_dir() / "train-images-idx3-ubyte.gz").exists(),
                                  reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
DATA = "data: {source: fmnist, images: 16}"


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with offline_cli_environment(tmp_path_factory.mktemp("env")) as tmp:
        yield tmp


@needs_fmnist
def test_moe_writes_a_pipeline_that_reloads_with_its_experts(dit_pipeline_dir, tmp_path):
    import compressdit  # noqa: F401
    from diffusers import DiTPipeline

    from compressdit.moe.layers import moe_layers

    recipe = write_recipe(tmp_path / "moe.yaml", f"""
        version: 1
        name: moe-tiny
        stages:
          - moe: {{experts: 7, shared_experts: 1, top_k: 3, grouping: taylor, batches: 1, batch_size: 4, {DATA}}}
          - distill: {{steps: 2, batch_size: 4, warmup: 0, balance_weight: 0.01, router_z_weight: 0.001, {DATA}}}
        """)
    out = tmp_path / "out"
    result = run_main("moe", dit_pipeline_dir, "--recipe", recipe, "--out", out, "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["recipe"] == "moe-tiny" and "moe_s" in summary["timings"]
    pipe = DiTPipeline.from_pretrained(out)
    layers = moe_layers(pipe.transformer)
    assert sorted(layers) == ["transformer_blocks.0.ff", "transformer_blocks.1.ff"]
    assert layers["transformer_blocks.0.ff"].layout.top_k == 3
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["structure"]["moe"]["transformer_blocks.1.ff"]["expert_hidden"] == 32


@pytest.mark.parametrize("moe, needles", [
    ("{experts: 4, shared_experts: 0, top_k: 5}", ["top_k 5 exceeds experts 4"]),
    ("{experts: 4, shared_experts: 1, top_k: 2, grouping: coactivation, batches: 1, batch_size: 2, " + DATA + "}",
     ["256 hidden neurons", "experts + shared_experts = 5 does not divide"])])
def test_bad_recipes_are_one_line_errors(dit_pipeline_dir, tmp_path, moe, needles):
    recipe = write_recipe(tmp_path / "bad.yaml", f"""
        version: 1
        name: bad
        stages:
          - moe: {moe}
        """)
    result = run_main("moe", dit_pipeline_dir, "--recipe", recipe, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, *needles)
    assert_nothing_written(tmp_path / "out")


def test_shipped_moe_recipes_parse():
    from compressdit.recipe import load_recipe

    for name, fraction in (("dense2moe-50", 0.5), ("dense2moe-62", 0.375), ("dense2moe-50-w8a8", 0.5)):
        recipe = load_recipe(name)
        assert recipe.stage("moe").config.activated_fraction() == fraction
        assert recipe.stage("distill").config.balance_weight > 0


@needs_fmnist
def test_mob_writes_a_pipeline_that_reloads_with_routed_blocks(dit_pipeline_dir, tmp_path):
    import compressdit  # noqa: F401
    from diffusers import DiTPipeline

    from compressdit.moe.blocks import routed_stacks

    recipe = write_recipe(tmp_path / "mob.yaml", f"""
        version: 1
        name: mob-tiny
        stages:
          - mob: {{group: 2, active: 1, batches: 1, batch_size: 4, {DATA}}}
          - distill: {{steps: 2, batch_size: 4, warmup: 0, layer_map: groups, balance_weight: 0.01, {DATA}}}
        """)
    out = tmp_path / "out"
    result = run_main("moe", dit_pipeline_dir, "--recipe", recipe, "--out", out, "--json")
    assert result.code == 0, result.stderr
    assert "mob_s" in json.loads(result.stdout)["timings"]
    blocks = routed_stacks(DiTPipeline.from_pretrained(out).transformer)["transformer_blocks"]
    assert [b.position for b in blocks] == [0, 1] and blocks[0].layout.active == 1
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["structure"]["mob"]["transformer_blocks"]["group"] == 2


def test_bad_mob_recipe_is_a_one_line_error(dit_pipeline_dir, tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", """
        version: 1
        name: bad
        stages:
          - mob: {group: 2, active: 3}
        """)
    result = run_main("moe", dit_pipeline_dir, "--recipe", recipe, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, "active 3 exceeds group 2")
    assert_nothing_written(tmp_path / "out")


def test_shipped_mob_recipe_parses():
    from compressdit.recipe import load_recipe

    recipe = load_recipe("mob-50")
    config = recipe.stage("mob").config
    assert config.active / config.group == 0.5
    assert recipe.stage("distill").config.layer_map == "groups"
