"""Speed against quality on the trained reference model zoo:dit-fmnist: every shipped quantization recipe and
every peer (torchao int8 weight-only / dynamic, bitsandbytes int8 / NF4 on the layers compressdit quantizes).

Quality: PSNR of each variant's samples against the float model's samples at equal seeds (the evaluation
report's metric, ``compressdit.evaluate.metrics.psnr``), ``--samples`` images of ``--steps`` steps, CFG 4.
Recipes run their own compression stages (calibration included) through ``build_baseline``, as the evaluate
stage builds a recipe baseline. Speed: time per guided step (CFG batch of the report's ``timing_batch``)
relative to the float model, on ``--threads`` threads, in interleaved rounds (ratio within a round, median). Usage::

    python bench/speed_quality.py            # writes bench/results/speed_quality_cpu.{json,md,png}
    python bench/speed_quality.py --quick    # 2 recipes, 2 peers, 4 images, 1 round
"""

from __future__ import annotations

import argparse
import copy
import datetime
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
from e2e_peers_report import machine, machine_line  # noqa: E402
from peer_models import VARIANTS, layer_plan  # noqa: E402

RESULTS = ROOT / "bench" / "results"
PEERS = ["torchao int8 weight-only", "torchao int8 dynamic", "bnb int8", "bnb nf4"]


def quantization_recipes() -> list[str]:
    """Shipped recipes that only calibrate and quantize (pruning recipes train for minutes: opt in by name)."""
    from compressdit.recipe import list_recipes, load_recipe

    return [n for n in list_recipes() if {s.name for s in load_recipe(n).stages} <= {"calibrate", "quantize",
                                                                                      "evaluate"}]


def build_variants(source, adapter, recipes: list[str], peers: list[str]) -> tuple[dict, dict]:
    """column -> (model, kind, seconds to build), column -> one-line error."""
    from compressdit.pipeline import build_baseline

    reference = source.transformer
    names = [n for n, spec in layer_plan(reference, adapter, "w8a8").items() if spec is not None]
    out, errors = {"bf16": (copy.deepcopy(reference).to(torch.bfloat16), "float", 0.0)}, {}
    for recipe in recipes:
        started = time.perf_counter()
        try:
            model = build_baseline(recipe, source, [], quiet=True, cache_dir=None).model.eval()
            out[recipe] = (model, "compressdit", round(time.perf_counter() - started, 1))
        except Exception as error:  # noqa: BLE001 - reported in the table
            errors[recipe] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(f"{recipe}: {errors.get(recipe) or f'built in {out[recipe][2]} s'}", flush=True)
    for peer in peers:
        started = time.perf_counter()
        try:
            model = VARIANTS[peer].convert(copy.deepcopy(reference), names)
            out[peer] = (model, "peer", round(time.perf_counter() - started, 1))
        except Exception as error:  # noqa: BLE001
            errors[peer] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        print(f"{peer}: {errors.get(peer) or 'built'}", flush=True)
    return out, errors


@torch.no_grad()
def images_of(adapter, model, source, conditions, steps: int):
    from compressdit.models.sampling import decode_latents, sample

    scheduler = source.scheduler or adapter.scheduler(model)
    latents = sample(adapter, model, conditions, scheduler, steps=steps, guidance=4.0, seed=0)
    return decode_latents(source.vae, latents.float())


def relative_times(adapter, reference, variants: dict, rounds: int) -> dict:
    """column -> (median ms per step, median time / float time within a round)."""
    from compressdit.evaluate.engine import EvalSettings, _step_latency

    settings = EvalSettings()
    runs = {"float": [], **{c: [] for c in variants}}
    for _ in range(rounds):
        runs["float"].append(_step_latency(adapter, reference, settings))
        for column, (model, _, _) in variants.items():
            runs[column].append(_step_latency(adapter, model, settings))
    return {c: (round(statistics.median(v) * 1e3, 3), round(statistics.median(
        t / f for t, f in zip(v, runs["float"])), 3)) for c, v in runs.items()}


def plot(rows: list[dict], path: Path, title: str, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"compressdit": ("o", "tab:blue"), "peer": ("s", "tab:red"), "float": ("^", "tab:gray")}
    for kind, (marker, color) in styles.items():
        points = [r for r in rows if r["kind"] == kind and r.get("psnr_db") is not None]
        ax.scatter([r["time_vs_float"] for r in points], [r["psnr_db"] for r in points], marker=marker, c=color,
                   label={"compressdit": "compressdit recipe", "peer": "peer", "float": "bf16"}[kind])
        for r in points:
            ax.annotate(r["variant"], (r["time_vs_float"], r["psnr_db"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axvline(1.0, color="k", lw=0.6, ls="--")
    ax.set_xlabel(f"time per guided step / float time ({threads} thread{'s' * (threads > 1)}; left of the dashed line = "
                  "faster than float)")
    ax.set_ylabel("PSNR vs float samples, same seeds (dB)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    meta = result["meta"]
    title = (f"zoo:dit-fmnist, {meta['samples']} images x {meta['steps']} steps; speed: CFG batch "
             f"{meta['timing_batch']}, {meta['threads']} thread{'s' * (meta['threads'] > 1)}")
    plot(result["rows"], out.with_suffix(".png"), title, meta["threads"])
    rows = sorted(result["rows"], key=lambda r: (r.get("time_vs_float") or 99))
    lines = ["# Speed vs quality on zoo:dit-fmnist (trained reference model), CPU", "", machine_line(meta) + ".", "",
             f"PSNR: {meta['samples']} samples ({meta['steps']} steps, CFG 4, seeds 0..{meta['samples'] - 1}) of each "
             "variant against the float model's samples at the same seeds (`compressdit.evaluate.metrics.psnr`). "
             f"Time: one guided step at CFG batch {meta['timing_batch']} (the report's timing), {meta['threads']} "
             f"thread, {meta['rounds']} interleaved round(s), time / float time within a round (median); float "
             f"takes {meta['float_ms']} ms per step. Recipes are built by their own stages (calibration included); "
             "peers quantize the same layers as the recipes (all but embedders and head).", "",
             f"![speed vs quality]({out.with_suffix('.png').name})", "",
             "| variant | kind | time / float | ms per step | PSNR (dB) | kernels or error |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['kind']} | {r.get('time_vs_float', '—')} | {r.get('ms', '—')} | "
                     f"{r.get('psnr_db', '—')} | {r.get('error') or r.get('kernels', '')} |")
    lines += ["", f"Shipped recipes not included: {', '.join(meta['recipes_left_out']) or 'none'} (by default only "
              "the recipes that calibrate and quantize are run: the pruning recipes train for minutes each)."]
    lines += [meta["note"]] if meta.get("note") else []
    out.with_suffix(".md").write_text("\n".join(lines + [""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=None, help="default: every quantization recipe")
    parser.add_argument("--peers", nargs="*", default=PEERS)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--note", default=None, help="a sentence for the markdown (e.g. why a recipe is left out)")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite .md/.png from --out's .json")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed_quality_cpu")
    args = parser.parse_args()
    if args.rewrite:
        result = json.loads(args.out.with_suffix(".json").read_text())
        result["meta"]["note"] = args.note or result["meta"].get("note")
        write_outputs(result, args.out)
        return
    from compressdit.evaluate.engine import EvalSettings, evaluation_conditions
    from compressdit.evaluate.metrics import psnr
    from compressdit.io.sources import load_source
    from compressdit.models import adapter_for
    from compressdit.quant.kernel_registry import kernel_summary, prepack_model
    from compressdit.recipe import list_recipes

    recipes = args.recipes or quantization_recipes()
    if args.quick:
        recipes, args.peers, args.samples, args.rounds = ["rtn-w8a8", "rtn-w4a16"], args.peers[1:3], 4, 1
        args.out = args.out.with_name(args.out.name + "_quick")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source = load_source("zoo:dit-fmnist")
    source.transformer = source.transformer.float().eval()
    adapter = adapter_for(source.transformer)
    meta = {**machine(args.threads), "samples": args.samples, "steps": args.steps, "rounds": args.rounds,
            "timing_batch": EvalSettings().timing_batch,
            "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "recipes_left_out": [n for n in list_recipes() if n not in recipes]}
    variants, errors = build_variants(source, adapter, recipes, args.peers)
    for model, _, _ in variants.values():
        prepack_model(model)
    conditions, _ = evaluation_conditions(adapter, args.samples)
    reference_images = images_of(adapter, source.transformer, source, conditions, args.steps)
    times = relative_times(adapter, source.transformer, variants, args.rounds)
    meta["float_ms"] = times["float"][0]
    rows = []
    for column, (model, kind, build_s) in variants.items():
        quality = psnr(images_of(adapter, model, source, conditions, args.steps), reference_images)
        rows.append({"variant": column, "kind": kind, "time_vs_float": times[column][1], "ms": times[column][0],
                     "psnr_db": round(quality, 2), "build_s": build_s,
                     "kernels": kernel_summary(model) or VARIANTS.get(column, VARIANTS["fp32"]).note})
        print(rows[-1], flush=True)
    rows += [{"variant": column, "kind": "peer" if column in args.peers else "compressdit", "error": error}
             for column, error in errors.items()]
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_outputs({"meta": meta, "rows": rows}, args.out)
    print(f"wrote {args.out.with_suffix('.json')}, .md and .png", flush=True)


if __name__ == "__main__":
    main()
