"""``compressdit quantize`` under ``accelerate launch`` (2 CPU processes, gloo): the calibration is split over the
ranks and reduced, rank 0 alone writes the output, which equals the single-process one; the other rank exits 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from compressdit.errors import ConfigError
from compressdit.pipeline import run_recipe
from compressdit.recipe import load_recipe
from tests.conftest import fresh_cache

ROOT = Path(__file__).resolve().parents[1]


def _recipe(folder: Path) -> Path:
    """w8a8 (balancing from calibration), 3 samples in batches of 2: rank 0 samples batch 0, rank 1 batch 1."""
    recipe = load_recipe("w8a8")
    recipe.stages = [s for s in recipe.stages if s.name != "evaluate"]
    recipe.stages[0].config.samples, recipe.stages[0].config.steps, recipe.stages[0].config.batch_size = 3, 2, 2
    path = folder / "w8a8-small.yaml"
    path.write_text(recipe.dump())
    return path


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for p in sorted(folder.glob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.mark.parametrize("stream", [False, True])
def test_two_ranks_write_the_single_process_checkpoint_once(dit_pipeline_dir, tmp_path, stream, monkeypatch):
    recipe = _recipe(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "COMPRESSDIT_CACHE": str(fresh_cache(tmp_path / "cache-ranks"))}
    # port 0: a free one (the suite's other process may run a 2-rank test of its own at the same time)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines",
              "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "compressdit.cli"]
    proc = subprocess.run([*launch, "quantize", str(dit_pipeline_dir), "-r", str(recipe), "--no-eval", "--json",
                           "-o", str(tmp_path / "ranks"), *(["--stream"] if stream else [])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"quantized_modules"') == 1  # one report: rank 0's
    assert not list(tmp_path.glob(".ranks.tmp-*"))
    monkeypatch.setenv("COMPRESSDIT_CACHE", str(tmp_path / "cache-one"))  # no statistics from the 2-rank run
    run_recipe(load_recipe(str(recipe)), str(dit_pipeline_dir), tmp_path / "one", quiet=True, stream=stream)
    ours, theirs = _tensors(tmp_path / "ranks" / "transformer"), _tensors(tmp_path / "one" / "transformer")
    assert any(k.endswith("smooth_scale") for k in ours) and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "ranks" / "transformer" / "config.json").read_text())["quantization_config"]


def test_evaluate_under_several_processes_is_refused(dit_pipeline_dir, tmp_path, monkeypatch):
    import compressdit.pipeline

    monkeypatch.setattr(compressdit.pipeline, "PartialState",
                        lambda: SimpleNamespace(num_processes=2, process_index=0, is_main_process=True))
    with pytest.raises(ConfigError, match="pass --no-eval and evaluate the checkpoint in one process"):
        run_recipe(load_recipe("w8a8"), str(dit_pipeline_dir), tmp_path / "out", quiet=True)
