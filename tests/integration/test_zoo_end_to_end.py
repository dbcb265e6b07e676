"""The main job on the shipped reference model: quantize, report, reload in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import fresh_cache

ROOT = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", COMPRESSDIT_CACHE=str(fresh_cache(tmp_path / "cache")),
               OMP_NUM_THREADS="1")
    return env


def _small_recipe(tmp_path: Path, name: str) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    for stage in recipe["stages"]:
        if "evaluate" in stage:
            stage["evaluate"].update(samples=20, steps=6, real_samples=200, fidelity_samples=4)
    path = tmp_path / f"{name}-small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_rtn_w8a8_on_dit_fmnist_writes_checkpoint_and_report_that_reload(tmp_path):
    out = tmp_path / "w8a8"
    run = subprocess.run([sys.executable, "-m", "compressdit.cli", "run", str(_small_recipe(tmp_path, "rtn-w8a8")),
                          "--model", "zoo:dit-fmnist", "--out", str(out), "--json"],
                         capture_output=True, text=True, env=_env(tmp_path), timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads(run.stdout)
    assert summary["quantized_modules"] > 12 * 6  # every block's attention, FFN and adaLN linears
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["columns"] == ["candidate", "reference", "baseline"]
    metrics = {m["name"]: m["values"] for m in report["metrics"]}
    accuracy = metrics["class accuracy"]
    assert accuracy["reference"] > 0.5, accuracy  # a trained model, not random weights
    assert abs(accuracy["candidate"] - accuracy["reference"]) <= 0.2
    assert metrics["PSNR vs reference (same seeds)"]["candidate"] > 15
    disk = metrics["transformer bytes on disk"]
    assert disk["candidate"] < disk["reference"]
    for name in ("report.md", "report.html", "samples_candidate.png", "layer_sqnr.png", "error_per_timestep.png"):
        assert (out / "report" / name).exists(), name
    assert "FID" not in (out / "report" / "report.md").read_text().replace("FD-", "")

    code = (
        "import torch, compressdit\n"
        "from diffusers import DiTPipeline\n"
        f"pipe = DiTPipeline.from_pretrained({str(out)!r})\n"
        "from compressdit.quant.layers import QuantLinear\n"
        "assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())\n"
        "image = pipe(class_labels=[7], num_inference_steps=4, guidance_scale=4.0, output_type='np',\n"
        "             generator=torch.Generator().manual_seed(0)).images\n"
        "assert image.shape[-3:-1] == (32, 32), image.shape\n"
        "print('ok')\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path),
                            timeout=300)
    assert loaded.returncode == 0 and "ok" in loaded.stdout, loaded.stderr[-2000:]
