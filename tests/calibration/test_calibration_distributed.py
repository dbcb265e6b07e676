"""Calibration split across processes equals the single-process statistics bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from compressdit.calibration.distributed import rank_batches, reduce_max
from compressdit.calibration.stats import ActivationStats

ROOT = Path(__file__).resolve().parents[2]


def calibrate(folder: Path) -> ActivationStats:
    """The calibrate stage on the DiT pipeline at ``folder``: 5 samples in batches of 2 (3 batches), no cache."""
    from compressdit.stages.calibrate import CalibrateConfig, run_calibration
    from tests.conftest import folder_state

    state = folder_state(folder, Path("unused"))
    state.cache_dir = None
    return run_calibration(state, CalibrateConfig(samples=5, steps=3, batch_size=2, guidance=1.5))


def test_batches_are_dealt_round_robin():
    ranks = [SimpleNamespace(num_processes=2, process_index=r) for r in (0, 1)]
    assert rank_batches(5, 2, ranks[0]) == [(0, 2), (4, 5)] and rank_batches(5, 2, ranks[1]) == [(2, 4)]
    assert rank_batches(2, 2, ranks[1]) == []
    single = SimpleNamespace(num_processes=1, process_index=0)
    assert rank_batches(5, 2, single) == [(0, 2), (2, 4), (4, 5)]
    per_step = {"a": {0: torch.ones(3)}}
    assert reduce_max(per_step, {"a": 3}, 1, single) is per_step


def test_two_processes_give_the_single_process_statistics(dit_pipeline_dir, tmp_path):
    """torchrun, 2 CPU processes, gloo: rank 0 samples batches 0 and 2, rank 1 batch 1; both end with the maxima one
    process records, and its mean squares up to rounding."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "calibration" / "two_process_calibration.py"), str(dit_pipeline_dir),
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)] == [[[0, 2], [4, 5]], [[2, 4]]]
    single = calibrate(dit_pipeline_dir)
    for rank in (0, 1):
        stats = ActivationStats.load(tmp_path / f"rank{rank}.safetensors")
        assert stats.timesteps == single.timesteps and stats.absmax.keys() == single.absmax.keys()
        assert all(torch.equal(stats.absmax[k], single.absmax[k]) for k in single.absmax)
        assert stats.meansq.keys() == single.meansq.keys()  # summed over the ranks: equal up to summation order
        assert all(torch.allclose(stats.meansq[k], single.meansq[k], rtol=1e-5, atol=0) for k in single.meansq)
