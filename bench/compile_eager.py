"""torch.compile against eager, one variant at a time: the time per guided denoising step of a real-size model
(random weights) for one compressdit recipe (or float), its eager and ``torch.compile``'d copies alternating in
rounds, nothing else in memory.

``bench/e2e_peers.py`` times the compiled copies too, interleaved with up to ten other variants of the same model
in memory; there the compiled ``w8a8`` came out 5-9% slower than its eager copy, which this run, with only the one
model in memory, checks (issue 13's bar: compiled no slower than eager). Usage::

    python bench/compile_eager.py                  # writes bench/results/compile_eager_cpu.{json,md}
    python bench/compile_eager.py --models "DiT-XL/2 256px" --variants w8a8 --rounds 2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from e2e_peers_report import machine, machine_line  # noqa: E402
from layer_kernels import write_results  # noqa: E402
from peer_models import VARIANTS, build, one_step, step_inputs  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def measure(model_name: str, variant: str, batch: int, rounds: int) -> dict:
    """Eager and compiled seconds per step (each the fastest of two steps a round), alternating, ``rounds``
    times; the ratio eager / compiled taken within each round, its median reported."""
    model, adapter, _ = build(model_name, variant)
    inputs = step_inputs(adapter, model, batch, VARIANTS[variant].dtype)
    compiled = torch.compile(model)
    with torch.no_grad():
        started = time.perf_counter()
        one_step(adapter, compiled, inputs)
        compile_s = time.perf_counter() - started
        one_step(adapter, model, inputs)
        times = {"eager": [], "compiled": []}
        for _ in range(rounds):
            for name, module in (("eager", model), ("compiled", compiled)):
                best = float("inf")
                for _ in range(2):
                    started = time.perf_counter()
                    one_step(adapter, module, inputs)
                    best = min(best, time.perf_counter() - started)
                times[name].append(best)
    del model, compiled
    torch._dynamo.reset()
    gc.collect()
    ratios = [e / c for e, c in zip(times["eager"], times["compiled"])]
    return {"model": model_name, "variant": variant, "batch": batch, "rounds": rounds,
            "compile_s": round(compile_s, 1), "eager_s": [round(t, 3) for t in times["eager"]],
            "compiled_s": [round(t, 3) for t in times["compiled"]],
            "compiled_speedup": round(statistics.median(ratios), 3)}


def write_markdown(result: dict, path: Path) -> None:
    lines = ["# torch.compile against eager, one variant in memory at a time (random weights)", "",
             machine_line(result["meta"]) + ".", "",
             "Per row: the eager model and its `torch.compile`'d copy (default mode) alternate for the rounds, each "
             "timed as the fastest of two guided steps; compiled speed-up = eager time / compiled time within a "
             "round, median over rounds (above 1: compiled faster).", "",
             "| model | variant | batch | eager s / step | compiled s / step | compiled speed-up | compile s |",
             "|---|---|---:|---|---|---:|---:|"]
    for row in result["rows"]:
        lines.append(f"| {row['model']} | {row['variant']} | {row['batch']} | "
                     f"{', '.join(f'{t:.3f}' for t in row['eager_s'])} | "
                     f"{', '.join(f'{t:.3f}' for t in row['compiled_s'])} | {row['compiled_speedup']:.3f}x | "
                     f"{row['compile_s']} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["DiT-XL/2 256px", "PixArt-alpha 256px"])
    parser.add_argument("--variants", nargs="+", default=["w8a8", "w4a16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "compile_eager_cpu")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    torch.set_num_threads(args.threads)
    meta = machine(args.threads)
    meta["started_utc"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    result = {"meta": meta, "rows": []}
    for model_name in args.models:
        for variant in args.variants:
            row = measure(model_name, variant, args.batch, args.rounds)
            print(row, flush=True)
            result["rows"].append(row)
    write_results(args.out, result, write_markdown)


if __name__ == "__main__":
    main()
