"""CPU time per guided denoising step of real-size DiT-XL/2 (random weights), float vs shipped recipes.

DiT-XL/2 at 256 px (28 blocks, hidden 1152, 256 tokens per image) is built from its real config with random
weights: this measures speed only, never quality. Each recipe's own layer rules are applied (see
``e2e_speed.quantized_copy``; calibration statistics replaced by unit ones, which do not change speed), and
one CFG-batched forward (2 x batch rows) is timed for fp32, bf16 and every recipe, interleaved in rounds so
that the ratios are taken within a round. Each layer runs its registered kernel (``kernels`` column).
Usage::

    python bench/e2e_speed_real.py --batches 1 8 --rounds 2   # writes bench/results/e2e_speed_real_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from e2e_speed import quantized_copy  # noqa: E402
from layer_kernels import cpu_flags, cpu_model  # noqa: E402
from real_size_memory import CONFIGS  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RECIPES = ["rtn-w8a8", "w8a8", "w4a16"]


@torch.no_grad()
def step_seconds(adapter, model, batch: int, dtype: torch.dtype) -> float:
    """One guided step: a single forward over ``2 * batch`` rows (conditional + unconditional)."""
    from compressdit.models.sampling import guided_prediction, initial_latents

    labels = [i % 1000 for i in range(batch)]
    cond = adapter.encode(model, labels)
    uncond = adapter.encode(model, adapter.null_conditions(batch))
    x = initial_latents(adapter, model, batch, 0).to(dtype)
    started = time.perf_counter()
    guided_prediction(adapter, model, x, torch.tensor([500]), cond, uncond, 4.0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_speed_real_cpu")
    args = parser.parse_args()
    import diffusers

    import compressdit  # noqa: F401
    from compressdit.models import adapter_for
    from compressdit.quant.kernel_registry import kernel_summary, prepack_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    class_name, config = CONFIGS["DiT-XL/2 (256px)"]
    reference = getattr(diffusers, class_name)(**config).eval()
    adapter = adapter_for(reference)
    variants = {"fp32": (reference, torch.float32)}
    variants["bf16"] = (copy.deepcopy(reference).to(torch.bfloat16), torch.bfloat16)
    for recipe in args.recipes:
        model = quantized_copy(reference, adapter, recipe)
        prepack_model(model)
        variants[recipe] = (model, torch.float32)
    meta = {"model": "DiT-XL/2 256px (random weights)", "cpu": cpu_model(), "cpu_flags": cpu_flags(),
            "torch": torch.__version__, "threads": args.threads, "rounds": args.rounds,
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    rows = []
    for batch in args.batches:
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, (model, dtype) in variants.items():  # warm-up (prepack, allocator)
            step_seconds(adapter, model, 1, dtype)
        for _ in range(args.rounds):
            for name, (model, dtype) in variants.items():
                times[name].append(step_seconds(adapter, model, batch, dtype))
                print(f"batch {batch} {name}: {times[name][-1]:.2f} s", flush=True)
        for name, (model, _) in variants.items():
            speedup = statistics.median(f / t for f, t in zip(times["fp32"], times[name]))
            rows.append({"batch": batch, "variant": name, "s_per_step": round(statistics.median(times[name]), 3),
                         "speedup_vs_fp32": round(speedup, 3), "kernels": kernel_summary(model) or "float"})
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"# Time per guided denoising step, {meta['model']}, CPU: {meta['cpu']} ({', '.join(meta['cpu_flags'])}),"
             f" torch {meta['torch']}, {meta['threads']} thread(s)", "",
             f"Median of {meta['rounds']} interleaved rounds; speed-up = fp32 time / variant time within a round. "
             f"Load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']} (a load near 1 is this run "
             "alone; higher means other jobs shared the 2 cores, and ratios are then more reliable than absolute "
             "times).", "",
             "| batch (CFG rows) | variant | s per step | speed-up vs fp32 | kernels |", "|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} ({2 * r['batch']}) | {r['variant']} | {r['s_per_step']} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {r['kernels']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
