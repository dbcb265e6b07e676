"""GPU time of one DiT-XL/2 linear per execution path, host overhead removed: 20 calls captured in a CUDA graph.

Shapes: DiT-XL/2's linears at a guided batch of 8 (4096 token rows; the adaLN linear sees 16 rows). Paths:
bf16 ``F.linear`` (cuBLAS); our int8 W8A8 as the Triton row quantizer + the Triton fused GEMM (autotuned, and
each candidate tile config alone), ``torch._int_mm`` alone; fp8: row quantizer + ``torch._scaled_mm``.
Usage: ``python bench/gpu_layer_graph.py [--out DIR]`` -> DIR/gpu_layer_graph.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import machine, machine_line, out_dir, write_json  # noqa: E402

SHAPES = [("attn to_q/k/v/out", 1152, 1152, 4096), ("ff fc1", 1152, 4608, 4096), ("ff fc2", 4608, 1152, 4096),
          ("adaLN linear", 1152, 6912, 16)]
EXTRA_CONFIGS = [(128, 128, 64, 4, 4), (128, 128, 64, 5, 8), (128, 64, 128, 4, 4), (64, 64, 128, 5, 4),
                 (128, 256, 64, 4, 8), (256, 128, 64, 4, 8), (64, 256, 128, 3, 8), (128, 128, 128, 4, 8),
                 (64, 128, 64, 5, 4), (128, 64, 64, 5, 4)]


def graph_us(fn, calls: int = 20, replays: int = 20) -> float:
    """Median GPU time per call (us) of ``calls`` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def measure_shape(name: str, k: int, n: int, m: int) -> dict:
    from compressdit.quant.gpu_reference import quantize_fp8_weight
    from compressdit.quant.gpu_triton import int8_gemm_fused, quantize_rows
    from compressdit.quant.primitives import quantize_weight_rtn

    torch.manual_seed(0)
    weight = torch.randn(n, k, device="cuda") * 0.02
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w_bf16 = weight.bfloat16()
    q = quantize_weight_rtn(weight, 8)
    codes_w, s_w = q.codes.contiguous(), q.scale.reshape(-1).float()
    codes, a_scale = quantize_rows(x, torch.int8)
    fp8_w, fp8_s = quantize_fp8_weight(weight)
    fp8_x, fp8_a = quantize_rows(x, torch.float8_e4m3fn)
    row = {"layer": name, "in": k, "out": n, "rows": m, "paths": {}}
    paths = {
        "bf16 F.linear": lambda: F.linear(x, w_bf16, bias),
        "int8 quantize_rows": lambda: quantize_rows(x, torch.int8),
        "int8 gemm fused (autotuned)": lambda: int8_gemm_fused(codes, a_scale, codes_w, s_w, bias, torch.bfloat16),
        "int8 full (quantize + gemm)": lambda: int8_gemm_fused(*quantize_rows(x, torch.int8), codes_w, s_w, bias,
                                                               torch.bfloat16),
        "torch._int_mm (no epilogue)": lambda: torch._int_mm(codes if m > 16 else F.pad(codes, (0, 0, 0, 32 - m)),
                                                             codes_w.t()),
        "fp8 _scaled_mm": lambda: torch._scaled_mm(fp8_x, fp8_w.t(), scale_a=fp8_a, scale_b=fp8_s.reshape(1, -1),
                                                   bias=bias, out_dtype=torch.bfloat16, use_fast_accum=True),
        "fp8 quantize_rows": lambda: quantize_rows(x, torch.float8_e4m3fn),
    }
    for bm, bn, bk, stages, warps in EXTRA_CONFIGS:
        if bm > max(16, 1 << (m - 1).bit_length()) or k % bk:
            continue
        config = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_stages": stages, "num_warps": warps}
        paths[f"int8 gemm {bm}x{bn}x{bk} s{stages} w{warps}"] = (
            lambda c=config: int8_gemm_fused(codes, a_scale, codes_w, s_w, bias, torch.bfloat16, c))
    for label, fn in paths.items():
        try:
            row["paths"][label] = round(graph_us(fn), 2)
        except Exception as error:  # noqa: BLE001 -- record and go on
            row["paths"][label] = f"{type(error).__name__}: {str(error)[:120]}"
        print(name, label, row["paths"][label], flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_layer_graph.py: needs a CUDA device")
    import compressdit  # noqa: F401

    rows = [measure_shape(*shape) for shape in SHAPES]
    meta = machine(torch.device("cuda"))
    out = out_dir(args.out)
    write_json(out / "gpu_layer_graph.json", {"meta": meta, "rows": rows})
    md = ["# GPU time per call of DiT-XL/2 linears (20 calls in one CUDA graph, median of 20 replays)", "",
          f"Machine: {machine_line(meta)}. bf16 activations, batch 8 guided (4096 rows; adaLN: 16 rows).", ""]
    for row in rows:
        bf16 = row["paths"].get("bf16 F.linear")
        md += [f"## {row['layer']} ({row['in']} -> {row['out']}), {row['rows']} rows", "",
               "| path | us | x bf16 |", "|---|---:|---:|"]
        for label, us in row["paths"].items():
            ratio = f"{bf16 / us:.2f}x" if isinstance(us, float) and isinstance(bf16, float) else ""
            md.append(f"| {label} | {us} | {ratio} |")
        md.append("")
    (out / "gpu_layer_graph.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


if __name__ == "__main__":
    main()
