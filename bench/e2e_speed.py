"""CPU time per guided denoising step of the zoo reference models, float vs shipped quantized recipes.

For each zoo model and recipe the recipe's own layer rules are applied to the reference model with the
recipe's specs (balancing, rotation, groups, VQ layout), and the time of one CFG-batched forward
(``timing_batch`` samples, as in the evaluation report) is measured with each layer's registered kernel
(the "quantized" column) and with every layer forced onto the dequantize-then-matmul reference (the
"reference" column: what ran before the kernels existed). Mixed-precision recipes (w4a8) use their base rule
for every layer. Speed does not depend on the values, so the layers are built as ``peer_models.speed_module`` builds
them (unit statistics, min-max ranges, nearest rounding, random VQ codes/codebooks, the randomized Hadamard on every
twin-log layer, which LRQ's ARS picks or DuQuant per layer from calibration): this measures speed, never quality. Each round times single
steps of float, quantized and reference in turn (``--steps`` each, the fastest kept: robust to other jobs' bursts on a
shared machine); ratios are per round, the median over ``--rounds`` rounds is reported. Usage::

    python bench/e2e_speed.py --threads 1     # writes bench/results/e2e_speed_cpu.{json,md}
    python bench/e2e_speed.py --threads 1 2 --compare bench/results/e2e_speed_cpu_before.json   # + before -> after
    python bench/e2e_speed.py --threads 1 2 --emulate avx2   # as on an AVX2-only CPU (bench/emulation.py)
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
from emulation import EMULATIONS, emulate, emulation_note  # noqa: E402
from layer_kernels import cpu_flags, cpu_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODELS = ["dit-fmnist", "pixart-fmnist", "flux-fmnist"]
RECIPES = ["rtn-w8a8", "w8a8", "rtn-w8a16", "w4a16", "rtn-w4a16", "w4a8", "rtn-w4a8", "rtn-w4a8-channel", "rtn-w3a16", "rtn-w2a16",
           "vq-w3", "vq-w2", "fp8", "rtn-w4a4", "lrq-w4a4", "lrq-w3a4", "svdquant-w4a4", "nvfp4", "mxfp4",
           "svdquant-nvfp4"]


def recipe_plan(model, adapter, recipe_name: str) -> dict:
    from compressdit.quant.transform import resolve_plan
    from compressdit.recipe import load_recipe

    stage = next(s for s in load_recipe(recipe_name).stages if s.name == "quantize")
    return resolve_plan(model, adapter, stage.config.options.rules)


@torch.no_grad()
def quantized_copy(reference, adapter, recipe_name: str):
    """A copy of ``reference`` whose layers the recipe quantizes are ``peer_models.speed_module``s."""
    from compressdit.quant.transform import set_module
    from peer_models import speed_module

    model = copy.deepcopy(reference)
    for name, spec in recipe_plan(model, adapter, recipe_name).items():
        if spec is not None:
            set_module(model, name, speed_module(model.get_submodule(name), spec, name))
    return model


@torch.no_grad()
def interleaved_step_ms(adapter, models: dict, settings, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per round, the fastest of ``steps`` single guided steps of each model, the models taken in turn."""
    from compressdit.evaluate.engine import step_inputs
    from compressdit.models.sampling import guided_prediction

    inputs = {k: step_inputs(adapter, m, settings) for k, m in models.items()}  # as the report's timing builds them
    for key, model in models.items():  # warm-up: prepacks, oneDNN primitive caches
        guided_prediction(adapter, model, *inputs[key])
    best: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        times: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(steps):
            for key, model in models.items():
                started = time.perf_counter()
                guided_prediction(adapter, model, *inputs[key])
                times[key].append(time.perf_counter() - started)
        for key in models:
            best[key].append(min(times[key]) * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="single steps per model and round (fastest kept)")
    parser.add_argument("--no-before", action="store_true", help="skip the reference-kernel column")
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_speed_cpu")
    parser.add_argument("--compare", type=Path, default=None,
                        help="an earlier run's .json: adds a before -> after table of the time-vs-float ratios")
    parser.add_argument("--emulate", choices=sorted(EMULATIONS), default=None,
                        help="run as on a lesser CPU (bench/emulation.py): its code paths on this CPU")
    args = parser.parse_args()
    emulate(args.emulate)
    from compressdit.evaluate.engine import EvalSettings
    from compressdit.io.sources import load_source
    from compressdit.models import adapter_for
    from compressdit.quant.kernel_registry import kernel_summary, set_kernel
    from peer_models import native_gelu

    from compressdit.quant.cpu_native import native_library

    settings = EvalSettings()
    result = {"meta": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
                       "cpu_count": os.cpu_count(), "native_cpu_passes": native_library() is not None,
                       "emulate": args.emulate, "capability": torch.backends.cpu.get_cpu_capability(),
                       "timing_batch": settings.timing_batch, "rounds": args.rounds, "steps": args.steps,
                       "loadavg_start": [round(v, 2) for v in os.getloadavg()]}, "rows": []}
    for name in args.models:
        reference = load_source(f"zoo:{name}").transformer.float().eval()
        adapter = adapter_for(reference)
        float_gelu = native_gelu(copy.deepcopy(reference))  # the C GELU every quantized copy runs
        for recipe in args.recipes:
            now = quantized_copy(reference, adapter, recipe)
            models = {"float": reference, "float_gelu": float_gelu, "now": now}
            if not args.no_before:
                models["before"] = copy.deepcopy(now)
                set_kernel(models["before"], "reference")
            for threads in args.threads:
                torch.set_num_threads(threads)
                load = os.getloadavg()[0]
                runs = interleaved_step_ms(adapter, models, settings, args.rounds, args.steps)
                ratios = [n / f for f, n in zip(runs["float"], runs["now"])]
                row = {"model": name, "recipe": recipe, "threads": threads, "kernels": kernel_summary(now),
                       "ms_float": round(statistics.median(runs["float"]), 2),
                       "ms_now": round(statistics.median(runs["now"]), 2),
                       "time_vs_float_now": round(statistics.median(ratios), 3),
                       "ms_float_gelu": round(statistics.median(runs["float_gelu"]), 2),
                       "time_vs_float_gelu_now": round(
                           statistics.median(n / f for f, n in zip(runs["float_gelu"], runs["now"])), 3),
                       "loadavg_1min": [round(load, 2), round(os.getloadavg()[0], 2)]}
                if "before" in runs:
                    row["ms_before"] = round(statistics.median(runs["before"]), 2)
                    row["time_vs_float_before"] = round(
                        statistics.median(b / f for f, b in zip(runs["float"], runs["before"])), 3)
                result["rows"].append(row)
                print(row, flush=True)
    result["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    meta = result["meta"]
    lines = [f"# Time per guided denoising step (CFG, batch {meta['timing_batch']}), CPU: {meta['cpu']} "
             f"({', '.join(meta['cpu_flags'])}, {meta['cpu_count']} cores), torch {meta['torch']}"
             + emulation_note(meta["emulate"], meta["capability"]), "",
             "Fused C passes (compressdit/quant/csrc/int8_rows.c, float_rows.c): "
             f"{'built and used' if meta['native_cpu_passes'] else 'not available (PyTorch passes)'}.", "",
             f"Median over {meta['rounds']} rounds of the fastest of {meta['steps']} single steps per model, the "
             "models taken in turn; time vs float = quantized / float within a round (median). \"reference\" = "
             "every quantized layer forced onto the dequantize-then-matmul reference. \"x float (C GELU)\" = "
             "quantized / the float model with compressdit's C tanh GELU, which every quantized copy runs after its "
             "quantized projections: the quantized layers' own share. Load average (1, 5, 15 min) "
             f"before/after: {meta['loadavg_start']} / {meta['loadavg_end']}; per row: the 1-min load before/after.",
             "",
             "| model | recipe | threads | float ms | quantized ms (x float) | x float (C GELU) "
             "| reference ms (x float) | kernels | load |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in result["rows"]:
        before = f"{r['ms_before']} ({r['time_vs_float_before']:.2f}x)" if "ms_before" in r else "—"
        lines.append(f"| {r['model']} | {r['recipe']} | {r['threads']} | {r['ms_float']} | {r['ms_now']} "
                     f"({r['time_vs_float_now']:.2f}x) | {r['time_vs_float_gelu_now']:.2f}x | {before} "
                     f"| {r['kernels']} | {r['loadavg_1min']} |")
    if args.compare is not None:
        lines += comparison(json.loads(args.compare.read_text()), result, args.compare)
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


def comparison(before: dict, after: dict, path: Path) -> list[str]:
    """Markdown lines: per recipe, each model x thread count's time vs float in ``before`` -> ``after``."""
    def ratios(run: dict) -> dict:
        return {(r["recipe"], r["model"], r["threads"]): r["time_vs_float_now"] for r in run["rows"]}

    old, new = ratios(before), ratios(after)
    columns = sorted({(m, t) for _, m, t in new}, key=lambda c: (MODELS.index(c[0]) if c[0] in MODELS else 99, c[1]))
    meta = before["meta"]
    lines = ["", "## Before -> after (time vs float, median of the per-round ratios)", "",
             f"Before: `{path.name}` (load average before/after {meta['loadavg_start']} / {meta['loadavg_end']}); "
             "after: the table above. Two runs, not interleaved: a ratio moves by a few percent between runs.", "",
             "| recipe | " + " | ".join(f"{m} {t}T" for m, t in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for recipe in dict.fromkeys(r for r, _, _ in new):
        cells = [f"{old[(recipe, m, t)]:.2f} -> {new[(recipe, m, t)]:.2f}" if (recipe, m, t) in old
                 else f"{new[(recipe, m, t)]:.2f}" for m, t in columns]
        lines.append(f"| {recipe} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
