"""VQ4DiT kernels vs bf16 cuBLAS on DiT-XL/2 and FLUX linear shapes (CUDA only).

For each layer shape, VQ config and row count M: median time of ``vq_linear`` with each CUDA strategy
(``fused``: GEMV for M <= 16, tiled GEMM above; ``decode_matmul``: decode kernel + cuBLAS) against
``torch.matmul`` with the bf16 weight, weight bytes (codes + codebook vs bf16) and the max abs error
against the PyTorch reference. Random codes and codebooks: this measures speed and bytes, never quality.
The L2 cache is flushed before every timed call (real models stream weights from HBM). Usage::

    COMPRESSDIT_JIT_CUDA=1 python bench/vq_kernel.py     # writes bench/results/vq_kernel.{json,md}
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))
from gpu_timing import median_ms  # noqa: E402  (CUDA events, L2 flushed before each call)

DEVICE = torch.device("cuda")

SHAPES = {  # model -> (layer, in_features, out_features)
    "DiT-XL/2": [("attn.to_out", 1152, 1152), ("attn.qkv", 1152, 3456), ("ff.fc1", 1152, 4608),
                 ("ff.fc2", 4608, 1152)],
    "FLUX": [("attn.to_out", 3072, 3072), ("ff.fc1", 3072, 12288), ("ff.fc2", 12288, 3072)],
}
VQ_CONFIGS = {"w2-d4-k256": (8, 4), "w3-d2-k64": (6, 2)}  # bits/weight, vector dim, codebook size
ROWS = [1, 16, 256, 1024, 4096]
STRATEGY_NAMES = ["fused", "decode_matmul"]


def measure(model: str, layer: str, in_features: int, out_features: int, config: str, rows: int,
            args: argparse.Namespace, flush: torch.Tensor | None) -> dict:
    from compressdit.quant.vq_ops import vq_linear, vq_linear_reference, vq_strategy

    code_bits, dim = VQ_CONFIGS[config]
    generator = torch.Generator(device="cuda").manual_seed(0)
    nbytes = in_features // dim * code_bits // 8
    codes = torch.randint(0, 256, (out_features, nbytes), dtype=torch.uint8, device="cuda", generator=generator)
    codebook = (torch.randn(1 << code_bits, dim, device="cuda", generator=generator) * 0.05).half()
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16, generator=generator)
    dense = torch.randn(in_features, out_features, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.05
    reference = vq_linear_reference(x, codes, codebook, None, in_features, code_bits).float()
    row = {"model": model, "layer": layer, "in_features": in_features, "out_features": out_features,
           "config": config, "rows": rows, "fused_kernel": "gemv" if rows <= 16 else "gemm",
           "vq_weight_bytes": codes.numel() + codebook.numel() * codebook.element_size(),
           "bf16_weight_bytes": dense.numel() * dense.element_size(),
           "bf16_matmul_ms": median_ms(lambda: torch.matmul(x, dense), DEVICE, args.warmup, args.repeats, flush)}
    for name in STRATEGY_NAMES:
        with vq_strategy(name):
            out = vq_linear(x, codes, codebook, None, in_features, code_bits)
            row[f"{name}_ms"] = median_ms(lambda: vq_linear(x, codes, codebook, None, in_features, code_bits),
                                          DEVICE, args.warmup, args.repeats, flush)
        row[f"{name}_max_abs_err"] = float((out.float() - reference).abs().max())
    row["reference_max_abs"] = float(reference.abs().max())
    return row


def write_results(rows: list[dict], machine: str, flushed: bool = True) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vq_kernel.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    cache = "L2 flushed" if flushed else "L2 warm"
    lines = [f"# VQ4DiT kernels vs bf16 cuBLAS (random weights, {cache}, median)", "", f"Machine: {machine}.", "",
             "| model | layer (in -> out) | VQ config | M | bf16 matmul | fused | decode + matmul | best vs bf16 | "
             "weights VQ / bf16 | max abs err (fused / decode) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        best = min(r["fused_ms"], r["decode_matmul_ms"])
        lines.append(
            f"| {r['model']} | {r['layer']} ({r['in_features']} -> {r['out_features']}) | {r['config']} | "
            f"{r['rows']} | "
            f"{r['bf16_matmul_ms'] * 1e3:.1f} us | {r['fused_ms'] * 1e3:.1f} us ({r['fused_kernel']}) | "
            f"{r['decode_matmul_ms'] * 1e3:.1f} us | {r['bf16_matmul_ms'] / best:.2f}x | "
            f"{r['vq_weight_bytes'] / 2**20:.2f} / {r['bf16_weight_bytes'] / 2**20:.2f} MiB | "
            f"{r['fused_max_abs_err']:.2g} / {r['decode_matmul_max_abs_err']:.2g} |")
    (RESULTS / "vq_kernel.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", choices=sorted(SHAPES), help="subset of the models (default: all)")
    parser.add_argument("--configs", nargs="*", choices=sorted(VQ_CONFIGS), help="subset of the VQ configs")
    parser.add_argument("--rows", nargs="*", type=int, default=ROWS, help=f"values of M (default: {ROWS})")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-flush", action="store_true", help="keep the L2 cache warm between calls")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/vq_kernel.py needs a CUDA GPU; none is visible (nothing measured)", file=sys.stderr)
        sys.exit(2)
    from compressdit.quant.vq_ops import cuda_extension_available

    if not cuda_extension_available():
        print("the VQ CUDA kernels do not load: build them (COMPRESSDIT_BUILD_CUDA=1 pip install -e .) "
              "or set COMPRESSDIT_JIT_CUDA=1", file=sys.stderr)
        sys.exit(2)
    flush = None if args.no_flush else torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    rows = []
    for model in args.models or SHAPES:
        for layer, in_features, out_features in SHAPES[model]:
            for config in args.configs or VQ_CONFIGS:
                for m in args.rows:
                    rows.append(measure(model, layer, in_features, out_features, config, m, args, flush))
                    print(json.dumps(rows[-1]), flush=True)
    write_results(rows, machine, flushed=flush is not None)


if __name__ == "__main__":
    main()
