"""Time of VQ4DiT quantization on real-size DiT-XL/2 (random weights: timing only, no quality).

Per recipe (``vq-w2``, ``vq-w3``): k-means codebooks + candidate sets for every quantized linear,
and the time of one zero-data calibration step (teacher forward + student forward/backward with
soft assignments + RMSprop) at batch 1 with CFG.

Usage: ``python bench/vq_quantization_time.py [--threads 2 --device cpu --calibration-steps 2]``;
writes bench/results/vq_quantization_time_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def dit_xl_2():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                 num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                                 norm_type="ada_norm_zero").eval()


def time_recipe(recipe_name: str, device: str, calibration_steps: int, soft_blocks: int) -> dict:
    from compressdit.models import adapter_for
    from compressdit.quant.context import QuantContext
    from compressdit.quant.formats import clamp_codebook
    from compressdit.quant.transform import resolve_plan, set_module
    from compressdit.quant.vq4dit import _Calibrator
    from compressdit.quant.vq_calibration import SoftVQLinear
    from compressdit.recipe import load_recipe

    config = next(s.config.options for s in load_recipe(recipe_name).stages if s.name == "quantize")
    model = dit_xl_2().to(device)
    adapter = adapter_for(model)
    plan = {n: clamp_codebook(s, model.get_submodule(n))
            for n, s in resolve_plan(model, adapter, config.rules).items() if s is not None}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    # k-means + candidate sets of every layer (each built and dropped: timing, not memory)
    started = time.perf_counter()
    for index, (name, spec) in enumerate(plan.items()):
        SoftVQLinear(model.get_submodule(name), spec, config.candidates, seed=index,
                     kmeans_iterations=config.kmeans_iterations)
    sync()
    kmeans_s = time.perf_counter() - started
    # one calibration step with the first ``soft_blocks`` blocks soft-quantized (all of them do not fit in
    # 24 GiB of CPU memory with autograd; the per-block cost scales the figure to 28 blocks)
    prefixes = tuple(f"transformer_blocks.{i}." for i in range(soft_blocks))
    layers = {n: SoftVQLinear(model.get_submodule(n), s, config.candidates, seed=i, kmeans_iterations=5)
              for i, (n, s) in enumerate(plan.items()) if n.startswith(prefixes)}
    teacher = dit_xl_2().to(device).requires_grad_(False)
    model.requires_grad_(False)
    for name, module in layers.items():
        set_module(model, name, module)
    ctx = QuantContext(adapter=adapter, scheduler=adapter.scheduler(model), conditions=[1, 2], quiet=True)
    calibrator = _Calibrator(teacher, model, layers, ctx, config)
    cond = adapter.encode(teacher, [207]).cat(adapter.encode(teacher, adapter.null_conditions(1)))
    cond = cond.to(device, torch.float32)
    latents = torch.randn(2, 4, 32, 32, device=device)
    calibrator.step(latents, torch.tensor([500], device=device), cond)  # warm-up
    sync()
    started = time.perf_counter()
    for _ in range(calibration_steps):
        calibrator.step(latents, torch.tensor([500], device=device), cond)
    sync()
    step_s = (time.perf_counter() - started) / calibration_steps
    return {"recipe": recipe_name, "layers": len(plan), "kmeans_s (all layers)": round(kmeans_s, 1),
            f"calibration step_s ({soft_blocks} of 28 blocks soft, b1 + CFG)": round(step_s, 2),
            "recipe calibration (runs x steps)": f"{config.iterations} x {config.steps}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--calibration-steps", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", default=["vq-w2", "vq-w3"])
    parser.add_argument("--soft-blocks", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [time_recipe(name, args.device, args.calibration_steps, args.soft_blocks) for name in args.recipes]
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.machine()} CPU"
    result = {"model": "DiT-XL/2 (256px, 28 blocks, hidden 1152), fp32 random weights",
              "device": args.device, "machine": machine, "threads": args.threads, "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"vq_quantization_time_{args.device.split(':')[0]}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    header = list(rows[0])
    md = [f"# VQ4DiT quantization time, DiT-XL/2 (random weights), {machine}, {args.threads} threads", "",
          "k-means: codebook (k-means++ seeding, Lloyd on <= 65536 sampled sub-vectors) + the 2 nearest "
          "codewords of every sub-vector, all quantized linears. Calibration: one step = teacher forward + "
          "student forward/backward with soft assignments + RMSprop, batch 1 with CFG, with the first "
          f"{args.soft_blocks} blocks soft-quantized (the whole model's soft state and autograd exceed this "
          "machine's 24 GiB; on a GPU all 28 blocks fit).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(str(r[k]) for k in header) + " |" for r in rows]
    (RESULTS / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
