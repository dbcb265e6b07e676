"""Time per denoising step and parameters of 50%-depth models vs the unpruned ones (CPU, or CUDA when present).

Speed depends on how many blocks remain, not on which: each model loses every other block of each stack
(``remove_blocks``), the same count ``tinyfusion-50`` / ``ppcl-50`` / ``blockinfluence-50`` remove. One step is
one classifier-free-guided forward (conditional + unconditional halves in one batch), median of ``--repeats``.
The reference models are the shipped zoo weights; real-size DiT-XL/2 uses random weights (timing only)::

    python bench/depth_speed.py --threads 1      # writes bench/results/depth_speed_cpu.{json,md}

Rows of models measured again replace their earlier rows; the others stay.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

DIT_XL = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
              sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")


def _load(name: str, device: str) -> torch.nn.Module:
    if name == "DiT-XL/2 (256px, random weights)":
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        return DiTTransformer2DModel(**DIT_XL).to(device).eval()
    from compressdit.io.sources import load_source

    return load_source(f"zoo:{name}").transformer.float().to(device).eval()


def _half_depth(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    from compressdit.models import adapter_for
    from compressdit.prune.depth import remove_blocks

    adapter = adapter_for(model)
    pruned = copy.deepcopy(model)
    keep = {}
    for stack in adapter.block_stacks:
        count = len(getattr(pruned, stack.attribute))
        kept = list(range(0, count, 2))
        if stack.keep_last and count - 1 not in kept:
            kept = kept[:-1] + [count - 1]
        keep[stack.attribute] = kept
    return remove_blocks(pruned, adapter, keep)


def _block_count(model: torch.nn.Module) -> int:
    from compressdit.models import adapter_for

    return sum(len(getattr(model, stack.attribute)) for stack in adapter_for(model).block_stacks)


@torch.no_grad()
def step_seconds(model: torch.nn.Module, batch: int, repeats: int, device: str) -> float:
    from compressdit.models import adapter_for
    from compressdit.models.sampling import guided_prediction, initial_latents
    from compressdit.evaluate.engine import evaluation_conditions

    adapter = adapter_for(model)
    conditions, _ = evaluation_conditions(adapter, batch)
    cond = adapter.encode(model, conditions).to(device, torch.float32)
    uncond = adapter.encode(model, adapter.null_conditions(batch)).to(device, torch.float32)
    x = initial_latents(adapter, model, batch, 0).to(device)
    t = torch.tensor([500], device=device)
    times = []
    for i in range(repeats + 2):  # two warm-up calls
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        guided_prediction(adapter, model, x, t, cond, uncond, 4.0)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["dit-fmnist", "pixart-fmnist", "flux-fmnist",
                                                        "DiT-XL/2 (256px, random weights)"])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 8, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in args.models:
        try:
            full = _load(name, device)
        except Exception as exc:  # a zoo model not trained yet
            print(f"skip {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            continue
        half = _half_depth(full)
        batches = [b for b in args.batches if not (name.startswith("DiT-XL") and b > 8 and device == "cpu")]
        for batch in batches:
            t_full, t_half = (step_seconds(m, batch, args.repeats, device) for m in (full, half))
            row = {"model": name, "batch": batch, "blocks": [_block_count(m) for m in (full, half)],
                   "parameters": [sum(p.numel() for p in m.parameters()) for m in (full, half)],
                   "ms_per_step": [round(1000 * t_full, 2), round(1000 * t_half, 2)],
                   "speedup": round(t_full / t_half, 3)}
            rows.append(row)
            print(json.dumps(row))
    meta = {"device": device if device == "cpu" else torch.cuda.get_device_name(), "threads": args.threads,
            "torch": torch.__version__, "machine": platform.machine(), "repeats": args.repeats}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"depth_speed_{device}"
    if stem.with_suffix(".json").exists():  # keep earlier rows of models not measured this time
        measured = {r["model"] for r in rows}
        earlier = json.loads(stem.with_suffix(".json").read_text())["rows"]
        rows = [r for r in earlier if r["model"] not in measured] + rows
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"# Depth pruning speed: 50% of the blocks removed ({meta['device']}, {args.threads} thread(s), "
             f"torch {meta['torch']}, median of {args.repeats})", "",
             "| model | batch (x2 CFG) | blocks | parameters | ms per step | speed-up |", "|---|---:|---|---|---|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['blocks'][0]} -> {r['blocks'][1]} | "
                     f"{r['parameters'][0]:,} -> {r['parameters'][1]:,} | {r['ms_per_step'][0]} -> "
                     f"{r['ms_per_step'][1]} | {r['speedup']}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
