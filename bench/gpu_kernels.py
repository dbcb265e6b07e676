"""Per-layer GEMM kernels on DiT-XL/2 shapes: bf16 cuBLAS vs int8 W8A8, fp8, int4 tinygemm and VQ.

For each layer shape (in -> out) and row count M: median time (CUDA events, L2 flushed, after warmup) of
``F.linear`` with the bf16 weight, ``compressdit::int8_linear_dyn`` with both backends (``cublas``:
``torch._int_mm`` + PyTorch epilogue; ``triton``: fused GEMM + epilogue, per-token quantization in one pass),
``compressdit::fp8_linear`` (``torch._scaled_mm``, row-wise scales), ``compressdit::int4_linear`` (tinygemm,
group 128) and ``compressdit::vq_linear`` (w2 d4 k256: ``fused`` kernel vs ``decode_matmul`` = decode +
cuBLAS), plus each output's relative error against the fp32 float layer. Random weights: this measures
speed, never quality. Usage::

    python bench/gpu_kernels.py                    # CUDA: writes $OUT or bench/results/gpu_kernels.{json,md}
    python bench/gpu_kernels.py --device cpu --quick --out /tmp/x    # smoke test of the script (references)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import error_text, fmt_ms, machine, machine_line, median_ms, out_dir, write_json  # noqa: E402

SHAPES = [("attn qkv", 1152, 3456), ("attn out", 1152, 1152), ("ff fc1", 1152, 4608), ("ff fc2", 4608, 1152)]
ROWS = [1, 16, 256, 1024, 4096]
VARIANTS = ["bf16", "int8-cublas", "int8-triton", "fp8", "int4-tinygemm", "vq-fused", "vq-decode+cublas"]
VQ_BITS, VQ_DIM = 8, 4  # w2: 4 weights per 8-bit index, 256 codewords
INT4_GROUP = 128


def layer_weights(in_features: int, out_features: int, device: torch.device) -> dict:
    """Float weight and every format's tensors for one layer shape (random, uneven row scales)."""
    from compressdit.quant.gpu_reference import pack_int4, quantize_fp8_weight, tinygemm_scales_and_zeros
    from compressdit.quant.primitives import quantize_weight_rtn

    gen = torch.Generator().manual_seed(in_features * 7 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    weight *= 1 + torch.rand(out_features, 1, generator=gen) * 3
    int8 = quantize_weight_rtn(weight, 8)
    int4 = quantize_weight_rtn(weight, 4, INT4_GROUP)
    fp8_weight, fp8_scale = quantize_fp8_weight(weight)
    nbytes = in_features // VQ_DIM * VQ_BITS // 8
    w = {"float": weight.to(device), "bf16": weight.to(device, torch.bfloat16),
         "int8": int8.codes.to(device), "int8_scale": int8.scale.reshape(-1).to(device),
         "fp8": fp8_weight.to(device), "fp8_scale": fp8_scale.to(device),
         "vq_codes": torch.randint(0, 256, (out_features, nbytes), dtype=torch.uint8, generator=gen).to(device),
         "vq_codebook": (torch.randn(1 << VQ_BITS, VQ_DIM, generator=gen) * 0.02).half().to(device)}
    try:
        w["int4"] = pack_int4(int4.codes, device)
        w["int4_sz"] = tinygemm_scales_and_zeros(int4.scale, None, INT4_GROUP, in_features).to(device)
    except (RuntimeError, ValueError) as error:
        w["int4_error"] = error_text(error)
    return w


def variant_call(name: str, x: torch.Tensor, w: dict):
    """A zero-argument callable computing the layer with ``name``'s kernel (raises if unavailable)."""
    from compressdit.quant.gpu_ops import fp8_linear, int4_linear, int8_linear_dyn
    from compressdit.quant.vq_ops import vq_linear, vq_strategy

    in_features = x.shape[-1]
    if name == "bf16":
        return lambda: F.linear(x, w["bf16"])
    if name.startswith("int8-"):
        backend = name.split("-", 1)[1]
        return lambda: int8_linear_dyn(x, w["int8"], w["int8_scale"], None, backend)
    if name == "fp8":
        return lambda: fp8_linear(x, w["fp8"], w["fp8_scale"], None)
    if name == "int4-tinygemm":
        if "int4_error" in w:
            raise RuntimeError(w["int4_error"])
        return lambda: int4_linear(x, w["int4"], w["int4_sz"], INT4_GROUP, None)
    strategy = "fused" if name == "vq-fused" else "decode_matmul"

    def vq():
        with vq_strategy(strategy):
            return vq_linear(x, w["vq_codes"], w["vq_codebook"], None, in_features, VQ_BITS)

    return vq


def float_truth(name: str, x: torch.Tensor, w: dict) -> torch.Tensor:
    if name.startswith("vq"):
        from compressdit.quant.vq_ops import vq_decode_reference

        weight = vq_decode_reference(w["vq_codes"], w["vq_codebook"], x.shape[-1], VQ_BITS).float()
        return F.linear(x.float(), weight)
    return F.linear(x.float(), w["float"])


def measure(shape: tuple, rows: int, w: dict, args, device, flush) -> dict:
    label, in_features, out_features = shape
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=gen).to(device, torch.bfloat16)
    row = {"layer": label, "in_features": in_features, "out_features": out_features, "rows": rows,
           "ms": {}, "rel_err": {}, "errors": {}}
    for name in VARIANTS:
        try:
            fn = variant_call(name, x, w)
            out = fn()
            row["rel_err"][name] = float((out.float() - float_truth(name, x, w)).norm()
                                         / float_truth(name, x, w).norm())
            row["ms"][name] = median_ms(fn, device, args.warmup, args.repeats, flush)
        except Exception as error:  # noqa: BLE001 -- one failing kernel must not stop the table
            row["errors"][name] = error_text(error)
    base = row["ms"].get("bf16")
    row["speedup_vs_bf16"] = {k: round(base / v, 3) for k, v in row["ms"].items() if base and v}
    return row


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# GEMM kernels on DiT-XL/2 layer shapes vs bf16 cuBLAS ({meta['device']}, median of "
             f"{meta['repeats']}, L2 {'flushed' if meta['flush'] else 'warm'}, random weights)", "",
             f"Machine: {machine_line(meta)}. VQ CUDA extension loaded: {meta['vq_extension']}. "
             f"int8 backends: `cublas` = torch._int_mm + PyTorch epilogue, `triton` = fused Triton GEMM. "
             f"Speed-up = bf16 time / kernel time. rel err = |y - y_float| / |y_float| (fp32 float layer; VQ: "
             f"its decoded weight).", "",
             "| layer (in -> out) | M | " + " | ".join(VARIANTS) + " |",
             "|---|---:|" + "---:|" * len(VARIANTS)]
    for r in result["rows"]:
        cells = []
        for name in VARIANTS:
            if name in r["ms"]:
                speed = r["speedup_vs_bf16"].get(name)
                cells.append(f"{r['ms'][name] * 1e3:.1f} us" + (f" ({speed:.2f}x)" if name != "bf16" else ""))
            else:
                cells.append("error" if name in r["errors"] else "-")
        lines.append(f"| {r['layer']} ({r['in_features']} -> {r['out_features']}) | {r['rows']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Relative error vs the float layer (at the largest M measured per shape):", "",
              "| layer | " + " | ".join(VARIANTS) + " |", "|---|" + "---:|" * len(VARIANTS)]
    last = {}
    for r in result["rows"]:
        last[r["layer"]] = r
    for layer, r in last.items():
        lines.append(f"| {layer} | " + " | ".join(fmt_ms(r["rel_err"].get(n), 4) for n in VARIANTS) + " |")
    errors = {(r["layer"], r["rows"], n): e for r in result["rows"] for n, e in r["errors"].items()}
    if errors or result.get("skipped"):
        lines += ["", "Errors / skipped:", ""]
        lines += [f"- {layer} M={rows} {name}: `{text}`" for (layer, rows, name), text in list(errors.items())[:40]]
        lines += [f"- skipped (time budget): {s}" for s in result.get("skipped", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="two shapes, M = 1 and 16, 2 repeats (smoke test)")
    parser.add_argument("--rows", nargs="*", type=int, default=ROWS)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--no-flush", action="store_true", help="keep the L2 cache warm between calls")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop measuring after this many seconds")
    parser.add_argument("--out", default=None, help="folder for gpu_kernels.{json,md} (default $OUT, bench/results)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_kernels.py: no CUDA device is visible; use --device cpu for a smoke test")
    shapes, rows = (SHAPES[:2], [1, 16]) if args.quick else (SHAPES, args.rows)
    if args.quick:
        args.warmup, args.repeats = 1, 2
    import compressdit  # noqa: F401  (registers the formats)
    from compressdit.quant.vq_ops import cuda_extension_available

    meta = machine(device)
    meta.update(repeats=args.repeats, warmup=args.warmup, flush=device.type == "cuda" and not args.no_flush,
                vq_extension=device.type == "cuda" and cuda_extension_available(), int4_group=INT4_GROUP,
                vq_config=f"w2 d{VQ_DIM} k{1 << VQ_BITS}")
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device=device) if meta["flush"] else None
    result = {"meta": meta, "rows": [], "skipped": []}
    out = out_dir(args.out)
    started = time.perf_counter()
    for shape in shapes:
        try:
            weights = layer_weights(shape[1], shape[2], device)
        except Exception as error:  # noqa: BLE001
            result["skipped"].append(f"{shape[0]}: {error_text(error)}")
            continue
        for m in rows:
            if time.perf_counter() - started > args.budget_s:
                result["skipped"].append(f"{shape[0]} M={m}")
                continue
            row = measure(shape, m, weights, args, device, flush)
            result["rows"].append(row)
            print(f"[gpu_kernels] {shape[0]} M={m}: " + ", ".join(f"{k} {v * 1e3:.1f}us" for k, v in row["ms"].items())
                  + (f"; errors: {sorted(row['errors'])}" if row["errors"] else ""), flush=True)
            write_json(out / "gpu_kernels.json", result)  # after every row: a timeout keeps what was measured
        del weights
    result["meta"]["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(out / "gpu_kernels.json", result)
    (out / "gpu_kernels.md").write_text(markdown(result))
    print(markdown(result), flush=True)


if __name__ == "__main__":
    main()
