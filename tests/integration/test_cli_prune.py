"""``compressdit prune``: the happy path on a tiny pipeline folder, and bad input (one ``error:`` line, exit 2)."""

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


@pytest.fixture(scope="module", autouse=True)
def offline_env(tmp_path_factory):
    with offline_cli_environment(tmp_path_factory.mktemp("env")) as tmp:
        yield tmp


@pytest.mark.parametrize("method", [pytest.param('{method: tinyfusion, pattern: "1:2", steps: 2, batch_size: 4, '
                                                 'data: {source: fmnist, images: 16}}', marks=needs_fmnist, id="tinyfusion"),
                                    pytest.param("{method: block_influence, ratio: 0.5, samples: 2, steps: 2}",
                                                 id="block_influence")])
def test_prune_writes_a_stock_pipeline(dit_pipeline_dir, tmp_path, method):
    from diffusers import DiTPipeline

    recipe = write_recipe(tmp_path / "half.yaml", f"""
        version: 1
        name: half
        stages:
          - prune: {method}
          - evaluate: {{samples: 4, steps: 2}}
        """)
    out = tmp_path / "out"
    result = run_main("prune", dit_pipeline_dir, "--recipe", recipe, "--out", out, "--no-eval", "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["recipe"] == "half" and summary["quantized_modules"] == 0
    assert len(summary["kept_blocks"]["transformer_blocks"]) == 1 and "prune_s" in summary["timings"]
    pipe = DiTPipeline.from_pretrained(out)  # stock diffusers, no compressdit involved
    assert pipe.transformer.config.num_layers == 1 and len(pipe.transformer.transformer_blocks) == 1
    assert "quantization_config" not in pipe.transformer.config
    assert not (out / "report").exists()  # --no-eval
    assert "prune:" in (out / "compressdit_recipe.yaml").read_text()


def test_unknown_recipe(dit_pipeline_dir, tmp_path):
    result = run_main("prune", dit_pipeline_dir, "--recipe", "tinyfusion-5", "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(result, "unknown recipe", "tinyfusion-5", "tinyfusion-50", "blockinfluence-50")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("prune, needles", [("{method: block_influence, ratio: 1.5}", ["ratio", "(0, 1)", "1.5"]),
                                            ("{method: tinyfusion, pattern: '4:2'}", ["pattern", "'4:2'"])])
def test_out_of_range_settings(dit_pipeline_dir, tmp_path, prune, needles):
    recipe = write_recipe(tmp_path / "bad.yaml", f"""
        version: 1
        name: bad
        stages:
          - prune: {prune}
        """)
    result = run_main("prune", dit_pipeline_dir, "--recipe", recipe, "--out", tmp_path / "out")
    assert result.code == 2
    assert_one_line_error(result, *needles)
    assert_nothing_written(tmp_path / "out")


@needs_fmnist
def test_prune_then_distill_an_fp16_pipeline_saves_what_it_evaluates(dit_pipeline_dir, tmp_path):
    """Distilled fp32 weights are rounded to the checkpoint's fp16 before saving, so the reload check holds."""
    from diffusers import DiTPipeline

    from compressdit.io.checkpoint import stored_float_dtype

    fp16 = tmp_path / "fp16"
    DiTPipeline.from_pretrained(dit_pipeline_dir, torch_dtype=torch.float16).save_pretrained(fp16)
    recipe = write_recipe(tmp_path / "kd.yaml", """
        version: 1
        name: kd
        stages:
          - prune: {method: removal_error, ratio: 0.5, samples: 2, steps: 2}
          - distill: {steps: 2, batch_size: 4, data: {source: fmnist, images: 16}, lr: 1.0e-3, warmup: 1}
        """)
    result = run_main("prune", fp16, "--recipe", recipe, "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert stored_float_dtype(tmp_path / "out" / "transformer") == torch.float16
    assert DiTPipeline.from_pretrained(tmp_path / "out").transformer.config.num_layers == 1


@needs_fmnist
def test_prune_report_puts_the_baseline_recipe_beside_the_candidate(dit_pipeline_dir, tmp_path):
    baseline = write_recipe(tmp_path / "base.yaml", """
        version: 1
        name: base
        stages:
          - prune: {method: removal_error, ratio: 0.5, samples: 2, steps: 2}
        """)
    recipe = write_recipe(tmp_path / "half.yaml", f"""
        version: 1
        name: half
        stages:
          - prune: {{method: block_influence, ratio: 0.5, samples: 2, steps: 2}}
          - evaluate: {{samples: 4, steps: 2, real_samples: 16, fidelity_samples: 2, effnet: false,
                        baseline: {baseline}}}
        """)
    out = tmp_path / "out"
    result = run_main("prune", dit_pipeline_dir, "--recipe", recipe, "--out", out, "--json")
    assert result.code == 0, result.stderr
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["columns"] == ["candidate", "reference", "baseline"] and report["baseline"] == "recipe base"
    parameters = next(m["values"] for m in report["metrics"] if m["name"] == "parameters")
    assert parameters["candidate"] < parameters["reference"]
    assert sorted(report["figures"]) == ["error_per_timestep", "fig_depth_pruning__block_influence"]  # no layer SQNR
    assert report["notes"][0].startswith("prune (block_influence): transformer_blocks: 1/2 kept")
    assert report["tables"][0]["header"] == ["stack", "block", "score", "decision"]
