"""``compressdit quantize --recipe nvfp4 / mxfp4 / rtn-w4a4`` on a DiT pipeline folder; stock reload of the result."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_cli_errors import assert_one_line_error, offline_cli_environment, run_main, write_recipe


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with offline_cli_environment(tmp_path_factory.mktemp("env")) as tmp:
        yield tmp


@pytest.mark.parametrize("recipe, layer_class", [("nvfp4", "BlockFPLinear"), ("mxfp4", "BlockFPLinear"),
                                                 ("rtn-w4a4", "QuantLinear")])
def test_w4a4_recipes_run_from_the_cli_and_reload(dit_pipeline_dir, tmp_path, recipe, layer_class):
    from diffusers import DiTTransformer2DModel

    from compressdit.quant.transform import quantized_modules

    out = tmp_path / "out"
    result = run_main("quantize", dit_pipeline_dir, "--recipe", recipe, "--out", out, "--no-eval", "--json")
    assert result.code == 0, result.stderr
    assert json.loads(result.stdout)["quantized_modules"] > 0
    reloaded = DiTTransformer2DModel.from_pretrained(out / "transformer")
    layers = quantized_modules(reloaded)
    assert layers and {type(m).__name__ for m in layers.values()} == {layer_class}
    assert all(m.spec.a_bits == 4 and m.spec.a_granularity == "per_group" for m in layers.values())
    float_model = DiTTransformer2DModel.from_pretrained(dit_pipeline_dir / "transformer")
    inputs = {"hidden_states": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
              "timestep": torch.tensor([10, 500]), "class_labels": torch.tensor([1, 7])}
    with torch.no_grad():
        ours, ref = reloaded(**inputs).sample, float_model(**inputs).sample
    assert torch.isfinite(ours).all() and 0 < ((ours - ref).norm() / ref.norm()).item() < 0.5


def test_activation_group_not_dividing_a_width_is_a_one_line_error(dit_pipeline_dir, tmp_path):
    recipe = write_recipe(tmp_path / "bad.yaml", """
        version: 1
        name: bad
        stages:
          - quantize:
              method: rtn
              rules:
                - {match: "role:embedder", spec: null}
                - {match: "re:.*", spec: {w_bits: 4, a_bits: 4, a_granularity: per_group, a_group_size: 48}}
        """)
    result = run_main("quantize", dit_pipeline_dir, "--recipe", recipe, "--out", tmp_path / "out", "--no-eval")
    assert_one_line_error(result, "not divisible by a_group_size 48")
