"""CPU time per guided denoising step of the zoo reference models, float vs shipped quantized recipes.

For each zoo model and recipe the recipe's own layer rules are applied to the reference model with the
recipe's specs (balancing, rotation, groups, VQ layout), and the time of one CFG-batched forward
(``timing_batch`` samples, as in the evaluation report) is measured with each layer's registered kernel
("now") and with every layer forced onto the dequantize reference ("before": what every release up to this
one ran). Speed does not depend on the values, so the calibration the recipes run is replaced by unit
statistics and VQ codes/codebooks are random: this measures speed, never quality. Float, now and before are
interleaved in ``--rounds`` rounds; ratios are per round, the median is reported. Usage::

    python bench/e2e_speed.py          # writes bench/results/e2e_speed_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from layer_kernels import cpu_flags, cpu_model  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MODELS = ["dit-fmnist", "pixart-fmnist", "flux-fmnist"]
RECIPES = ["rtn-w8a8", "w8a8", "w4a16", "rtn-w4a16", "w4a8", "vq-w3"]


def recipe_plan(model, adapter, recipe_name: str) -> dict:
    from compressdit.quant.transform import resolve_plan
    from compressdit.recipe import load_recipe

    stage = next(s for s in load_recipe(recipe_name).stages if s.name == "quantize")
    return resolve_plan(model, adapter, stage.config.options.rules)


@torch.no_grad()
def quantized_copy(reference, adapter, recipe_name: str):
    from compressdit.quant.formats import FORMATS, clamp_codebook
    from compressdit.quant.transform import set_module

    model = copy.deepcopy(reference)
    for name, spec in recipe_plan(model, adapter, recipe_name).items():
        if spec is None:
            continue
        linear = model.get_submodule(name)
        if spec.format == "vq":
            spec = clamp_codebook(spec, linear)
            module = FORMATS.get("vq").empty(linear, spec)
            count = linear.in_features // spec.vector_dim
            module.load_codes(torch.randint(0, spec.codebook_size, (linear.out_features, count)),
                              torch.randn(spec.codebook_size, spec.vector_dim) * 0.05,
                              torch.ones(linear.out_features) if spec.row_scale else None)
        else:
            module = FORMATS.get(spec.format).quantize(linear, spec, torch.ones(linear.in_features))
        set_module(model, name, module)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_speed_cpu")
    args = parser.parse_args()
    from compressdit.evaluate.engine import EvalSettings, _step_latency
    from compressdit.io.sources import load_source
    from compressdit.models import adapter_for
    from compressdit.quant.kernel_registry import kernel_summary, set_kernel

    settings = EvalSettings()
    result = {"meta": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
                       "timing_batch": settings.timing_batch, "rounds": args.rounds,
                       "loadavg_start": [round(v, 2) for v in os.getloadavg()]}, "rows": []}
    for name in args.models:
        reference = load_source(f"zoo:{name}").transformer.float().eval()
        adapter = adapter_for(reference)
        for recipe in args.recipes:
            now = quantized_copy(reference, adapter, recipe)
            before = copy.deepcopy(now)
            set_kernel(before, "reference")
            for threads in args.threads:
                torch.set_num_threads(threads)
                runs = {"float": [], "now": [], "before": []}
                for _ in range(args.rounds):
                    for key, model in (("float", reference), ("now", now), ("before", before)):
                        runs[key].append(_step_latency(adapter, model, settings) * 1e3)
                ratio_now = statistics.median(f / n for f, n in zip(runs["float"], runs["now"]))
                ratio_before = statistics.median(f / b for f, b in zip(runs["float"], runs["before"]))
                row = {"model": name, "recipe": recipe, "threads": threads, "kernels": kernel_summary(now),
                       "ms_float": round(statistics.median(runs["float"]), 2),
                       "ms_now": round(statistics.median(runs["now"]), 2),
                       "ms_before": round(statistics.median(runs["before"]), 2),
                       "time_vs_float_now": round(1 / ratio_now, 3), "time_vs_float_before": round(1 / ratio_before, 3)}
                result["rows"].append(row)
                print(row, flush=True)
    result["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    meta = result["meta"]
    lines = [f"# Time per guided denoising step (CFG, batch {meta['timing_batch']}), CPU: {meta['cpu']} "
             f"({', '.join(meta['cpu_flags'])}), torch {meta['torch']}", "",
             f"Median of {meta['rounds']} interleaved rounds; time vs float = quantized / float within a round "
             f"(median). Load average before/after: {meta['loadavg_start']} / {meta['loadavg_end']}.", "",
             "| model | recipe | threads | float ms | now ms (x float) | before ms (x float) | kernels now |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['recipe']} | {r['threads']} | {r['ms_float']} | {r['ms_now']} "
                     f"({r['time_vs_float_now']:.2f}x) | {r['ms_before']} ({r['time_vs_float_before']:.2f}x) "
                     f"| {r['kernels']} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
