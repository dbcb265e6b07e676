"""Host (CPU-side) cost of one eager call of each GPU path of a quantized linear, and where it goes.

Eager DiT-XL/2 steps with quantized layers are host-bound on a fast GPU (bench/results/gpu_e2e_h200.md): the
GPU finishes a layer before Python has launched the next. This times back-to-back calls of one DiT-XL/2
layer (1152 -> 4608) at M rows without synchronising in between (``us/call`` = max(host, GPU) per call;
``host us`` = the launch loop's wall time alone), and prints a cProfile of the shipped layer's call.

Usage: ``python bench/gpu_host_overhead.py [--rows 4096] [--out DIR]`` -> DIR/gpu_host_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import machine, machine_line, out_dir, write_json  # noqa: E402


def _paths(rows: int):
    import compressdit  # noqa: F401
    from compressdit.quant.gpu_ops import fp8_linear, int8_linear_dyn
    from compressdit.quant.gpu_reference import quantize_fp8_weight, quantize_rows_reference
    from compressdit.quant.gpu_triton import int8_gemm_fused, quantize_rows
    from compressdit.quant.layers import QuantLinear
    from compressdit.quant.spec import LinearQuantSpec

    torch.manual_seed(0)
    linear = torch.nn.Linear(1152, 4608).cuda().bfloat16()
    layer = QuantLinear.from_linear(copy.deepcopy(linear).float(), LinearQuantSpec(w_bits=8, a_bits=8)).cuda()
    x = torch.randn(rows, 1152, device="cuda", dtype=torch.bfloat16)
    w, s = layer.weight.data, layer.weight_scale.reshape(-1).float()
    codes, a_scale = quantize_rows(x, torch.int8)
    fp8_w, fp8_s = quantize_fp8_weight(linear.weight.float())
    return {
        "bf16 F.linear": lambda: F.linear(x, linear.weight, linear.bias),
        "QuantLinear w8a8 (registry)": lambda: layer(x),
        "int8_linear_dyn triton (op)": lambda: int8_linear_dyn(x, w, s, layer.bias, "triton"),
        "int8_linear_dyn cublas (op)": lambda: int8_linear_dyn(x, w, s, layer.bias, "cublas"),
        "quantize_rows (triton)": lambda: quantize_rows(x, torch.int8),
        "quantize_rows_reference (torch)": lambda: quantize_rows_reference(x, torch.int8),
        "int8_gemm_fused (triton, autotuned)": lambda: int8_gemm_fused(codes, a_scale, w, s, layer.bias, x.dtype),
        "torch._int_mm": lambda: torch._int_mm(codes, w.t()),
        "fp8_linear (op)": lambda: fp8_linear(x, fp8_w, fp8_s, linear.bias),
    }, layer, x


def _time(fn, calls: int) -> tuple[float, float]:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / calls, 1e6 * host / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_host_overhead.py: needs a CUDA device")
    paths, layer, x = _paths(args.rows)
    rows = []
    with torch.no_grad():
        for name, fn in paths.items():
            try:
                per_call, host = _time(fn, args.calls)
                rows.append({"path": name, "us_per_call": round(per_call, 1), "host_us": round(host, 1)})
            except Exception as error:  # noqa: BLE001 -- record and go on
                rows.append({"path": name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            print(rows[-1], flush=True)
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.calls):
            layer(x)
        profile.disable()
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    meta = {**machine(torch.device("cuda")), "rows": args.rows, "calls": args.calls}
    out = out_dir(args.out)
    write_json(out / "gpu_host_overhead.json", {"meta": meta, "rows": rows, "profile": text.getvalue()[-6000:]})
    md = [f"# Host cost per eager call, DiT-XL/2 fc1 (1152 -> 4608), {args.rows} rows, bf16 activations", "",
          f"Machine: {machine_line(meta)}. {args.calls} calls back to back, one synchronisation at the end.", "",
          "| path | us per call | host us per call |", "|---|---:|---:|"]
    md += [f"| {r['path']} | {r.get('us_per_call', r.get('error', ''))} | {r.get('host_us', '')} |" for r in rows]
    md += ["", "cProfile of the shipped layer (QuantLinear w8a8 via the registry), by own time:", "", "```",
           text.getvalue()[-4000:], "```"]
    (out / "gpu_host_overhead.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
