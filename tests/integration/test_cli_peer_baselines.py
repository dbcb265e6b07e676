"""A recipe's report with a calibrating peer (NVIDIA ModelOpt) as its baseline column, on a pipeline folder."""

from __future__ import annotations

import json
import math

import torch

from tests.integration.test_cli_errors import offline_cli_environment, run_main, write_recipe
from tests.integration.test_cli_prune import needs_fmnist

torch.set_num_threads(1)


@needs_fmnist
def test_report_puts_modelopt_beside_the_candidate_calibrated_on_the_recipe_set(dit_pipeline_dir, tmp_path):
    recipe = write_recipe(tmp_path / "w8a8-small.yaml", """
        version: 1
        name: w8a8-small
        stages:
          - calibrate: {samples: 2, steps: 2, batch_size: 2}
          - quantize:
              method: rtn
              rules:
                - {match: "role:embedder", spec: null}
                - {match: "role:head", spec: null}
                - {match: "re:.*", spec: {w_bits: 8, a_bits: 8}}
          - evaluate: {samples: 4, steps: 2, real_samples: 16, fidelity_samples: 2, effnet: false,
                       baseline: modelopt-int8-sq}
        """)
    out = tmp_path / "out"
    with offline_cli_environment(tmp_path / "env"):
        result = run_main("quantize", dit_pipeline_dir, "--recipe", recipe, "--out", out, "--json")
    assert result.code == 0, result.stderr[-3000:]
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["columns"] == ["candidate", "reference", "baseline"]
    assert report["baseline"].startswith("modelopt-int8-sq: NVIDIA ModelOpt INT8 SmoothQuant")
    psnr = next(m["values"] for m in report["metrics"] if m["name"].startswith("PSNR"))
    assert math.isfinite(psnr["baseline"]) and math.isfinite(psnr["candidate"])
    assert json.loads(result.stdout)["out"]  # ModelOpt's progress prints ("Inserted N quantizers") stay out of --json
