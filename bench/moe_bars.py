"""Dense2MoE bars on zoo:dit-fmnist: a distilled candidate (e.g. dense2moe-50) beside the dense teacher and a
baseline checkpoint (e.g. width-ffn-50 distilled with the same budget), one evaluation at identical seeds (the
report machinery: FD-FMNIST, class accuracy, PSNR to the dense samples), plus total and activated parameters.

    PYTHONPATH=$PWD nice -n 15 python bench/moe_bars.py CANDIDATE_DIR BASELINE_DIR OUT_DIR [--samples 256]

Writes OUT_DIR/report.{json,md,html} and OUT_DIR/bars.json (metrics by column, parameters, wall time).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compressdit.cache import default_cache_dir
from compressdit.evaluate.engine import Entry
from compressdit.io.sources import load_source
from compressdit.moe.blocks import activated_parameters
from compressdit.stages.evaluate import EvaluateConfig, run_evaluation


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidate")
    parser.add_argument("baseline")
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference", default="zoo:dit-fmnist")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    reference = load_source(args.reference, cache_dir=default_cache_dir())
    entries = {}
    for column, spec in (("candidate", args.candidate), ("baseline", args.baseline)):
        source = load_source(spec)
        entries[column] = Entry(column, source.transformer, spec, source.transformer_folder)
    config = EvaluateConfig.from_dict({"samples": args.samples, "steps": args.steps, "guidance": 4.0, "seed": 0},
                                      "evaluate")
    report = run_evaluation(entries["candidate"], reference, config, args.out, "Dense2MoE bars on dit-fmnist",
                            cache_dir=default_cache_dir(), baseline=entries["baseline"])
    models = {"reference": reference.transformer, **{k: e.model for k, e in entries.items()}}
    params = {k: {"total": sum(p.numel() for p in m.parameters()), "activated": activated_parameters(m)}
              for k, m in models.items()}
    bars = {"metrics": {m["name"]: m["values"] for m in report["metrics"]}, "parameters": params,
            "samples": args.samples, "steps": args.steps, "wall_s": round(time.perf_counter() - started, 1),
            "candidate": args.candidate, "baseline": args.baseline}
    (args.out / "bars.json").write_text(json.dumps(bars, indent=1))
    print(json.dumps(bars, indent=1))


if __name__ == "__main__":
    main()
