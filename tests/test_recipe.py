"""Tests for compressdit.recipe: shipped recipes parse and round-trip; every invalid recipe is a named ConfigError."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models import adapter_for
from compressdit.quant.layers import QuantizedLinear
from compressdit.io.sources import ModelSource
from compressdit.quant.methods import METHODS
from compressdit.quant.spec import LinearQuantSpec
from compressdit.recipe import (RECIPE_VERSION, RECIPES_DIR, Recipe, data_free_recipes, list_recipes, load_recipe,
                                recipe_config)
from compressdit.stages import STAGES
from compressdit.stages.base import PipelineState
from tests.conftest import tiny_dit

SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
QUANTIZING = [name for name in SHIPPED if any("quantize" in stage for stage in
                                              yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())["stages"])]

VALID = {
    "version": RECIPE_VERSION,
    "name": "test",
    "description": "a test recipe",
    "stages": [
        {"quantize": {"method": "rtn", "rules": [
            {"match": "role:embedder", "spec": None},
            {"match": "re:.*", "spec": {"w_bits": 8, "a_bits": 8}},
        ]}},
        {"evaluate": {"samples": 8, "steps": 2}},
    ],
}


def _with(path: tuple, value) -> dict:
    """VALID with the entry at ``path`` replaced (a path ending in a new key adds it)."""
    data = copy.deepcopy(VALID)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


def test_shipped_recipes_are_listed():
    assert SHIPPED and list_recipes() == SHIPPED
    assert {"rtn-w8a8", "rtn-w4a8", "rtn-w4a16"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_parses_and_round_trips(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.version == RECIPE_VERSION and recipe.description
    assert load_recipe(str(RECIPES_DIR / f"{name}.yaml")) == recipe  # by path too
    data = recipe.to_dict()
    assert Recipe.from_dict(data) == recipe
    assert Recipe.from_dict(yaml.safe_load(recipe.dump())) == recipe
    assert yaml.safe_load(recipe.dump()) == data
    dumped = tmp_path / "again.yaml"
    dumped.write_text(recipe.dump())
    assert load_recipe(str(dumped)) == recipe
    quantize = recipe.stage("quantize")
    assert (quantize is not None) == (name in QUANTIZING)
    if quantize is None:
        return
    assert quantize.config.method in METHODS
    assert isinstance(quantize.config.options, METHODS.get(quantize.config.method).config_class)
    assert quantize.config.options.rules
    # the dump keeps every key of the shipped file's quantize stage (nothing dropped or renamed)
    raw = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
    raw_quantize = next(s["quantize"] for s in raw["stages"] if "quantize" in s)
    dumped_quantize = next(s["quantize"] for s in data["stages"] if "quantize" in s)
    assert dumped_quantize["rules"] == [
        {"match": r["match"], "spec": None if r["spec"] is None else {**LinearQuantSpec().to_dict(), **r["spec"]}}
        for r in raw_quantize["rules"]]


@pytest.mark.parametrize("name", QUANTIZING)
def test_shipped_recipe_quantize_stage_runs_on_a_tiny_dit(name):
    recipe = load_recipe(name)
    model = tiny_dit()
    adapter = adapter_for(model)
    source = ModelSource("tiny", Path("."), model, scheduler=adapter.scheduler(model))
    state = PipelineState(source=source, adapter=adapter, model=model, workdir=Path("."), reference_spec="tiny")
    for stage in recipe.stages:
        if stage.name == "calibrate":  # the shipped settings, shrunk to test size
            stage.config.samples, stage.config.steps = 4, 2
        options = getattr(stage.config, "options", None)
        mixed = getattr(options, "mixed_precision", None)
        if mixed is not None:
            mixed.probe_samples, mixed.probe_steps = 2, 2
        if hasattr(options, "iterations"):  # VQ4DiT's calibration, shrunk
            options.iterations, options.steps, options.kmeans_iterations = 1, 2, 5
        if hasattr(options, "adaround"):  # FP4DiT's AdaRound, shrunk
            options.adaround.iters = 5
        if stage.name not in ("evaluate", "prune", "distill", "moe"):  # pruning, distillation: tests/stages; MoE: tests/moe
            STAGES.get(stage.name).run(state, stage.config)
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == set(state.quant_specs) and quantized
    for layer in adapter.linear_layers(model):
        role = adapter.role_of(layer)
        expected_float = role in ("embedder", "head")
        assert (layer not in quantized) == expected_float, (layer, role)
    assert type(model.proj_out_1) is nn.Linear
    options = next(s.config.options for s in recipe.stages if s.name == "quantize")
    allowed = {r.spec.w_bits for r in options.rules if r.spec is not None}
    if getattr(options, "mixed_precision", None) is not None:
        allowed.add(options.mixed_precision.high_bits)
    assert {s.w_bits for s in state.quant_specs.values()} <= allowed


def test_valid_recipe_parses():
    recipe = Recipe.from_dict(copy.deepcopy(VALID), "t.yaml")
    assert [s.name for s in recipe.stages] == ["quantize", "evaluate"]
    rules = recipe.stage("quantize").config.options.rules
    assert rules[0].spec is None and rules[1].spec == LinearQuantSpec(w_bits=8, a_bits=8)
    assert recipe.stage("evaluate").config.samples == 8 and recipe.stage("calibrate") is None


@pytest.mark.parametrize("data,message", [
    (_with(("steps",), []), "unknown recipe key 'steps'"),
    (_with(("version",), 2), "recipe version must be 1, got 2"),
    (_with(("version",), "1"), "recipe version must be 1, got '1'"),
    ({k: v for k, v in VALID.items() if k != "version"}, "recipe version must be 1, got None"),
    (_with(("stages",), [{"sparsify": {"ratio": 0.5}}]), r"stages\[0\]: unknown stage 'sparsify'"),
    (_with(("stages",), []), "'stages' must be a non-empty list"),
    (_with(("stages",), [{"quantize": {"method": "rtn", "rules": []}, "evaluate": {}}]), "single-key mapping"),
    (_with(("stages", 0, "quantize", "method"), "gptq"), r"unknown method 'gptq'; known: .*rtn"),
    (_with(("stages", 0, "quantize"), {"rules": []}), "needs a 'method'"),
    (_with(("stages", 0, "quantize", "rules"), []), r"rules: at least one rule"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "wbits"), 4), r"rules\[1\]\.spec: unknown key 'wbits'"),
    (_with(("stages", 0, "quantize", "rules", 1, "priority"), 1), r"rules\[1\]: unknown key 'priority'"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "w_bits"), 9), r"rules\[1\]\.spec\.w_bits: 9 is out of range"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "w_bits"), 1), r"rules\[1\]\.spec\.w_bits: 1 is out of range"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "a_bits"), 16), r"rules\[1\]\.spec\.a_bits: 16 is out of"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "w_bits"), True), r"rules\[1\]\.spec\.w_bits: expected int"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "group_size"), 0), r"group_size: must be positive"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "a_granularity"), "per_channel"), "'per_channel' is not"),
    (_with(("stages", 0, "quantize", "rules", 1, "spec", "format"), "nvfp5"), r"spec\.format: unknown format 'nvfp5'"),
    (_with(("stages", 0, "quantize", "rules", 1, "match"), "re:(unclosed"), r"rules\[1\]\.match: invalid regex"),
    (_with(("stages", 1, "evaluate", "samples"), 1), r"evaluate\.samples: need at least 2"),
    (_with(("stages", 1, "evaluate", "sample"), 1), r"evaluate: unknown key 'sample'"),
    (_with(("name",), ""), "'name' must be a non-empty string"),
    ([1, 2], "must be a mapping"),
])
def test_invalid_recipes_are_config_errors_naming_the_problem(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        Recipe.from_dict(data, "bad.yaml")
    assert str(info.value).startswith("bad.yaml")


def test_unknown_recipe_name_and_bad_yaml_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown recipe 'rtn-w3a3'; shipped: .*rtn-w8a8"):
        load_recipe("rtn-w3a3")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nstages: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_recipe(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="is a folder; pass a recipe YAML file"):
        load_recipe(str(tmp_path))


# -- recipe_config: a data-free recipe as a diffusers quantization_config ---------------------------------------------

def test_data_free_recipes_are_the_rounding_only_ones():
    names = data_free_recipes()
    assert {"rtn-w8a8", "rtn-w4a16", "nvfp4", "mxfp4", "fp8"} <= set(names)
    assert not {"w8a8", "w4a16", "gptq-w4a16", "vq-w3", "svdquant-w4a4", "tinyfusion-50"} & set(names)
    config = recipe_config("rtn-w8a8")
    rules = load_recipe("rtn-w8a8").stage("quantize").config.options.rules
    assert config.rules == rules and config.modules == {} and config.modules_to_not_convert == []
    assert recipe_config("nvfp4", modules_to_not_convert=["proj_out"]).modules_to_not_convert == ["proj_out"]


@pytest.mark.parametrize("name, needles", [
    ("w8a8", ["calibrate stage", "compressdit quantize|prune|moe MODEL --recipe w8a8", "rtn-w8a8"]),
    ("tinyfusion-50", ["prune stage", "rtn-w8a8"]),
])
def test_recipe_config_of_a_recipe_that_needs_data_says_what_to_run(name, needles):
    with pytest.raises(ConfigError) as info:
        recipe_config(name)
    assert all(needle in str(info.value) for needle in needles), str(info.value)


def test_recipe_config_of_a_recipe_file_and_of_two_quantize_stages(tmp_path):
    data = yaml.safe_load((RECIPES_DIR / "rtn-w4a16.yaml").read_text())
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    assert recipe_config(str(path)).rules == recipe_config("rtn-w4a16").rules
    data["stages"].insert(1, copy.deepcopy(data["stages"][0]))
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="more than one quantize stage"):
        recipe_config(str(path))


@pytest.mark.parametrize("family", ["pixart", "flux"])
def test_recipe_config_quantizes_a_pipeline_as_it_loads(text_pipeline_dir, tmp_path, family):
    """diffusers' pipeline-level quantization (``PipelineQuantizationConfig``) with a compressdit recipe: the
    transformer's layers as the recipe's rules resolve on it, the pipeline's own call equal to the float pipeline
    quantized by hand, saved and reloaded by stock diffusers to the same images."""
    import compressdit
    import torch
    from diffusers import DiffusionPipeline, PipelineQuantizationConfig

    from compressdit.quant.transform import quantize_layers, quantized_modules, resolve_plan

    folder = text_pipeline_dir(family)
    mapping = PipelineQuantizationConfig(quant_mapping={"transformer": compressdit.recipe_config("rtn-w8a8")})
    pipe = DiffusionPipeline.from_pretrained(folder, quantization_config=mapping)
    by_hand = DiffusionPipeline.from_pretrained(folder)
    rules = load_recipe("rtn-w8a8").stage("quantize").config.options.rules
    plan = resolve_plan(by_hand.transformer, adapter_for(by_hand.transformer), rules)
    quantize_layers(by_hand.transformer, {n: s for n, s in plan.items() if s is not None})
    assert set(quantized_modules(pipe.transformer)) == set(quantized_modules(by_hand.transformer))
    assert not quantized_modules(pipe.text_encoder)

    def generate(p):
        sizes = dict(use_resolution_binning=False) if family == "pixart" else dict(height=64, width=64)
        return p("a shirt", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
                 **sizes).images

    images = generate(pipe)
    assert (images == generate(by_hand)).all()
    pipe.save_pretrained(tmp_path / "q")
    assert (generate(DiffusionPipeline.from_pretrained(tmp_path / "q")) == images).all()
