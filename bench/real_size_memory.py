"""Weight bytes, checkpoint bytes and peak memory of real-size DiT-XL/2 and PixArt-alpha (random weights).

Each (model, scheme) runs in its own subprocess so that peak RSS is its own. Random weights measure
memory and time only, never quality. Usage::

    python bench/real_size_memory.py            # writes bench/results/real_size_memory.{json,md}
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

CONFIGS = {
    "DiT-XL/2 (256px)": ("DiTTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")),
    "PixArt-alpha (512px)": ("PixArtTransformer2DModel", dict(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=64, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
        norm_type="ada_norm_single", use_additional_conditions=False)),
}
SCHEMES = {
    "bf16": None,
    "W8A8": {"w_bits": 8, "a_bits": 8},
    "W4A8 (per channel)": {"w_bits": 4, "a_bits": 8},
    "W4A8-MP (4.5 avg bits)": {"w_bits": 4, "a_bits": 8, "mixed_to": 4.5},
    "VQ W3A16 (d2 k64)": {"format": "vq", "w_bits": 3},
    "VQ W2A16 (d4 k256)": {"format": "vq", "w_bits": 2},
}


def measure(model_name: str, scheme: str) -> dict:
    """Build, quantize (RTN packing; the method does not change bytes), save, reload, one forward."""
    import torch
    import diffusers

    import compressdit  # noqa: F401
    from compressdit.io.checkpoint import folder_bytes
    from compressdit.io.diffusers_quantizer import attach_quantizer
    from compressdit.models import adapter_for
    from compressdit.quant.spec import LinearQuantSpec
    from compressdit.quant.transform import LayerRule, quantize_layers, resolve_plan

    torch.set_num_threads(2)
    class_name, config = CONFIGS[model_name]
    cls = getattr(diffusers, class_name)
    with torch.device("cpu"):
        model = cls(**config).to(torch.bfloat16).eval()
    adapter = adapter_for(model)
    spec = SCHEMES[scheme]
    result = {"model": model_name, "scheme": scheme, "parameters": sum(p.numel() for p in model.parameters())}
    started = time.perf_counter()
    if spec is not None:
        spec = dict(spec)
        mixed_to = spec.pop("mixed_to", None)
        base = LinearQuantSpec.from_dict(spec, scheme)
        rules = [LayerRule(match="role:embedder"), LayerRule(match="role:head"), LayerRule(match="re:.*", spec=base)]
        plan = resolve_plan(model, adapter, rules)
        if mixed_to is not None:  # promote whole layers to W8 (largest first) until the budget is met
            names = sorted((n for n, s in plan.items() if s), key=lambda n: -model.get_submodule(n).weight.numel())
            total = sum(model.get_submodule(n).weight.numel() for n in names)
            budget = (mixed_to - 4) * total
            for name in names[::7]:
                cost = 4 * model.get_submodule(name).weight.numel()
                if cost <= budget:
                    plan[name] = LinearQuantSpec(w_bits=8, a_bits=8)
                    budget -= cost
            avg = sum((plan[n].w_bits) * model.get_submodule(n).weight.numel() for n in names) / total
            result["avg_weight_bits"] = round(avg, 3)
        with torch.no_grad():
            quantize_layers(model, plan)
        attach_quantizer(model, {n: s for n, s in plan.items() if s})
    result["convert_s"] = round(time.perf_counter() - started, 2)
    result["weights_in_memory_bytes"] = int(model.get_memory_footprint())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        result["checkpoint_bytes"] = folder_bytes(Path(tmp))
        del model
        out = subprocess.run([sys.executable, __file__, "--load", model_name, tmp], capture_output=True, text=True,
                             check=True)
    result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def load_and_forward(model_name: str, folder: str) -> dict:
    """Fresh process: stock from_pretrained + one denoising forward; peak RSS covers exactly that."""
    import torch
    import diffusers

    import compressdit  # noqa: F401

    torch.set_num_threads(2)
    class_name, config = CONFIGS[model_name]
    model = getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    result = {}
    x = torch.randn(1, 4, config["sample_size"], config["sample_size"], dtype=torch.bfloat16)
    t = torch.tensor([500])
    with torch.no_grad():
        started = time.perf_counter()
        if class_name == "DiTTransformer2DModel":
            model(x, timestep=t, class_labels=torch.tensor([1]))
        else:
            model(x, encoder_hidden_states=torch.randn(1, 120, 4096, dtype=torch.bfloat16), timestep=t,
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
        result["forward_s_cpu_batch1"] = round(time.perf_counter() - started, 2)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that across exec, so a
    child spawned by the process that built the float model would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SCHEME"))
    parser.add_argument("--load", nargs=2, metavar=("MODEL", "FOLDER"))
    parser.add_argument("--models", nargs="*", help="subset of the configs (default: all)")
    parser.add_argument("--schemes", nargs="*", help="subset of the schemes (default: all)")
    parser.add_argument("--rows-from", help="write the results from JSON rows printed by an earlier run")
    args = parser.parse_args()
    if args.rows_from:
        write_results([json.loads(line) for line in Path(args.rows_from).read_text().splitlines()
                       if line.startswith("{")])
        return
    if args.load:
        print(json.dumps(load_and_forward(*args.load)))
        return
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    rows = []
    for model_name in args.models or CONFIGS:
        for scheme in args.schemes or SCHEMES:
            out = subprocess.run([sys.executable, __file__, "--one", model_name, scheme], capture_output=True,
                                 text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    write_results(rows)


def write_results(rows: list[dict]) -> None:
    for row in rows:
        ref = next(r for r in rows if r["model"] == row["model"] and r["scheme"] == "bf16")
        row["memory_ratio_vs_bf16"] = round(ref["weights_in_memory_bytes"] / row["weights_in_memory_bytes"], 3)
        row["checkpoint_ratio_vs_bf16"] = round(ref["checkpoint_bytes"] / row["checkpoint_bytes"], 3)
    machine = f"{platform.machine()} CPU, {platform.python_version()}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_size_memory.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = ["# Real-size transformer memory (random weights)", "", f"Machine: {machine}.", "",
             "| model | scheme | weights in memory | ratio vs bf16 | checkpoint | ratio | peak RSS (load + forward) | forward (CPU, b1) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['scheme']} | {r['weights_in_memory_bytes'] / 2**20:.0f} MiB | "
                     f"{r['memory_ratio_vs_bf16']:.2f}x | {r['checkpoint_bytes'] / 2**20:.0f} MiB | "
                     f"{r['checkpoint_ratio_vs_bf16']:.2f}x | {r['peak_rss_bytes'] / 2**20:.0f} MiB | "
                     f"{r['forward_s_cpu_batch1']:.2f} s |")
    (RESULTS / "real_size_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
