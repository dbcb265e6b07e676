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


def test_flux_pipeline_with_its_own_encoders_splits_every_mlp_then_quantizes(text_pipeline_dir, tmp_path):
    """A user's FLUX pipeline (own random T5 / CLIP encoders): Dense2MoE splits the double-stream FFNs and the
    single-stream parallel MLPs, w8a8 quantizes the result, the report runs (its per-layer SQNR leaves out the
    layers inside MoE experts and the TailSum projections, which have no namesake in the dense reference), and
    stock ``FluxPipeline`` reloads it."""
    import compressdit  # noqa: F401
    from diffusers import FluxPipeline

    from compressdit.moe.layers import TailSum, moe_layers
    from compressdit.quant.transform import quantized_modules

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a bag", "a coat")))
    recipe = write_recipe(tmp_path / "moe-w8a8.yaml", """
        version: 1
        name: moe-w8a8-flux
        stages:
          - moe: {experts: 3, shared_experts: 1, top_k: 2, grouping: taylor, batches: 1, batch_size: 2,
                  data: {source: teacher, images: 4, steps: 2}}
          - distill: {steps: 1, batch_size: 2, warmup: 0, balance_weight: 0.01,
                      data: {source: teacher, images: 4, steps: 2}}
          - calibrate: {samples: 2, steps: 2, batch_size: 2}
          - quantize:
              method: viditq
              rules:
                - {match: "role:embedder", spec: null}
                - {match: "role:head", spec: null}
                - {match: "re:.*\\\\.router", spec: null}
                - {match: "re:.*", spec: {w_bits: 8, a_bits: 8, balance: 0.5, a_granularity: per_token}}
          - evaluate: {samples: 2, steps: 2, effnet: false}
        """)
    out = tmp_path / "out"
    result = run_main("moe", text_pipeline_dir("flux"), "--recipe", recipe, "--out", out,
                      "--calib", tmp_path / "prompts.jsonl", "--quiet")
    assert result.code == 0, result.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["layer_sqnr"]["layers"] and not any(".experts." in n or ".shared." in n or n.endswith("proj_out.proj")
                                                      for n in report["layer_sqnr"]["layers"])
    pipe = FluxPipeline.from_pretrained(out)
    block = pipe.transformer.single_transformer_blocks[0]
    assert type(block.proj_out) is TailSum and "single_transformer_blocks.0.proj_out.proj" in quantized_modules(
        pipe.transformer)
    assert "single_transformer_blocks.1.proj_mlp" in moe_layers(pipe.transformer)
    image = pipe("a bag", num_inference_steps=2, height=32, width=32, output_type="pt", max_sequence_length=16).images
    assert torch.isfinite(image).all()
