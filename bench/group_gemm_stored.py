"""The integer GEMM (``cpu-int-groups`` / ``cpu-int8-group-gemm``, csrc/group_gemm.c) on a layer's stored 4-bit nibbles
against the copy packed for its tiles at load (what those kernels kept until 2026-12-07): per call, same weights, same
activations, the same library build, in one process.

Three weight kinds: NVFP4 (E2M1 nibbles through their 16-entry table, groups of 16 with a scale per group of the
activations: the ``nvfp4`` / ``mxfp4`` / ``rtn-w4a4`` layers; their corrections computed in the GEMM as each pair
(AVX2: each block) is packed, no array of them kept), W4A8 g64 (offset nibbles, one int8 activation scale a
row: ``rtn-w4a8`` / ``gptq-w4a8``; AVX512-VNNI only) and W8A8 (int8 codes, one group, one activation scale a row:
``w8a8`` / ``rtn-w8a8``; on AVX2 signed activation codes, the packed copy what the kernel kept there until
2026-12-07). DiT-XL/2's shapes (qkv, out, fc1, fc2, adaLN's 1152 -> 6912) at several row counts
with 1 and 2 threads; the weights are cycled through enough copies (``--cold-mb``) that each call reads them from
memory, as a model's layers do. Every (kind, shape, rows, threads) cell times both layouts alternately, ``--rounds``
times; the table gives the median times and the median of the per-round ratios. Random codes: speed only. Usage::

    python bench/group_gemm_stored.py     # writes bench/results/group_gemm_stored_cpu.{json,md}
    python bench/group_gemm_stored.py --kinds w4a8-g64 --rows 1 2 --threads 1 --out /tmp/x
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from layer_kernels import cpu_flags, cpu_model, write_results  # noqa: E402

SHAPES = [("attn.qkv", 1152, 3456), ("attn.to_out", 1152, 1152), ("ff.fc1", 1152, 4608), ("ff.fc2", 4608, 1152),
          ("adaLN", 1152, 6912)]
ROWS = [1, 2, 4, 16, 64, 256, 512, 1024]
#: kind -> (GEMM group, one activation scale a row, activation offset, how many activation code values)
KINDS = {"nvfp4": (16, False, 12.0, 25), "w4a8-g64": (64, True, 128.0, 256), "w8a8": (None, True, 128.0, 256)}


def _signed() -> bool:
    """W8A8 on group_gemm's AVX2 path: signed activation codes (no offset, ``flush=0``)."""
    from compressdit.quant.cpu_native import group_gemm_isa

    return group_gemm_isa() == "avx2"


def _weights(kind: str, in_features: int, out_features: int, copies: int) -> list[tuple[dict, dict]]:
    from compressdit.quant.cpu_kernels import OFFSET_NIBBLE_CODES, pack_weight, stored_nibble_weight
    from compressdit.quant.minifloat import MINIFLOATS, unpack_nibbles

    group, _, offset, _ = KINDS[kind]
    gen = torch.Generator().manual_seed(in_features + out_features)
    if kind == "w8a8":  # the layer's int8 codes as stored, or packed once
        offset = 0.0 if _signed() else offset
        out = []
        for _ in range(copies):
            codes = torch.randint(-128, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
            scale = torch.rand(out_features, 1, generator=gen) + 0.01
            out.append((pack_weight(codes, scale, in_features, offset),
                        pack_weight(codes, scale, in_features, offset, stored=codes)))
        return out
    if kind == "nvfp4":  # E2M1's values times 2: integers
        table = (MINIFLOATS.get("e2m1").decode(torch.arange(16, dtype=torch.uint8)) * 2).to(torch.int8)
    else:
        table = OFFSET_NIBBLE_CODES
    out = []
    for _ in range(copies):
        nibbles = torch.randint(0, 256, (out_features, in_features // 2), generator=gen, dtype=torch.uint8)
        scale = torch.rand(out_features, in_features // group, generator=gen) + 0.01
        packed = pack_weight(table[unpack_nibbles(nibbles).long()], scale, group, offset, nibbles=True)
        # as the kernels keep them: cpu-int-groups (NVFP4) without corrections (the GEMM computes them as it packs)
        out.append((packed, stored_nibble_weight(nibbles, table, scale, group, offset, corr=kind != "nvfp4")))
    return out


def _time(weights: list[dict], codes: torch.Tensor, a_scale: torch.Tensor, out_features: int, row_group,
          offset: int, flush: int = 1) -> float:
    from compressdit.quant.cpu_native import group_gemm

    calls = max(len(weights), 3)
    started = time.perf_counter()
    for i in range(calls):
        b = weights[i % len(weights)]
        group_gemm(codes, a_scale, b["packed"], b["corr"], b["w_scale"], None, out_features, table=b["table"],
                   row_group=row_group, offset=offset, flush=flush)
    return (time.perf_counter() - started) / calls


def measure(kinds: list[str], rows_list: list[int], threads_list: list[int], rounds: int, cold_mb: float) -> list:
    cells = []
    for kind in kinds:
        group, row_scales, offset, codes_top = KINDS[kind]
        for name, in_features, out_features in SHAPES:
            copies = max(1, int(cold_mb * 2 ** 20 // (in_features * out_features // (1 if kind == "w8a8" else 2))))
            weights = _weights(kind, in_features, out_features, copies)
            packed, stored = [w[0] for w in weights], [w[1] for w in weights]
            for threads in threads_list:
                torch.set_num_threads(threads)
                for rows in rows_list:
                    gen = torch.Generator().manual_seed(rows)
                    codes = torch.randint(0, codes_top, (rows, in_features), generator=gen, dtype=torch.uint8)
                    a_scale = torch.rand(rows, 1 if row_scales else in_features // group, generator=gen)
                    row_group = (group or in_features) if row_scales else None
                    args = (codes, a_scale, out_features, row_group, int(offset), 1)
                    if kind == "w8a8" and _signed():  # int8 codes, each product exact on AVX2
                        codes = torch.randint(-127, 128, (rows, in_features), generator=gen, dtype=torch.int8)
                        args = (codes, a_scale, out_features, row_group, 0, 0)
                    _time(packed, *args)  # warm-up: scratch, threads
                    _time(stored, *args)
                    times = {"packed": [], "stored": []}
                    for _ in range(rounds):
                        times["packed"].append(_time(packed, *args))
                        times["stored"].append(_time(stored, *args))
                    ratios = [s / p for s, p in zip(times["stored"], times["packed"])]
                    cell = {"kind": kind, "layer": name, "in": in_features, "out": out_features, "rows": rows,
                            "threads": threads, "copies": copies,
                            "packed_ms": round(statistics.median(times["packed"]) * 1e3, 4),
                            "stored_ms": round(statistics.median(times["stored"]) * 1e3, 4),
                            "stored_over_packed": round(statistics.median(ratios), 3)}
                    cells.append(cell)
                    print(cell, flush=True)
    return cells


def write_markdown(result: dict, path: Path) -> None:
    meta = result["meta"]
    lines = [f"# Stored nibbles vs a packed copy on the integer GEMM: {meta['cpu']}, torch {meta['torch']}", "",
             f"`python bench/group_gemm_stored.py {meta['args']}`; started {meta['started']}; CPU flags "
             f"{', '.join(meta['flags'])}; load average before/after {meta['loadavg_start']} / {meta['loadavg_end']}. "
             f"Median of {meta['rounds']} alternating rounds; the weights cycled through enough copies to be read from "
             "memory. `stored / packed` > 1: the stored nibbles' call takes longer. What each layout holds besides "
             "the layer's own nibbles (0.5 byte a weight): the packed copy another 0.5 byte a weight and the "
             "groups' int32 corrections and fp32 scales (8 bytes a group of a channel); the stored nibbles the "
             "scales and, for W4A8 g64, the corrections (NVFP4's computed in the GEMM as each pair is packed). "
             "W8A8: the layer's int8 codes (1 byte a weight) as stored, or besides them a packed copy (another "
             "byte a weight).", ""]
    for kind in dict.fromkeys(c["kind"] for c in result["cells"]):
        for threads in dict.fromkeys(c["threads"] for c in result["cells"]):
            cells = [c for c in result["cells"] if c["kind"] == kind and c["threads"] == threads]
            rows = list(dict.fromkeys(c["rows"] for c in cells))
            lines += [f"## {kind}, {threads} thread(s): packed ms -> stored ms (stored / packed)", "",
                      "| layer | " + " | ".join(f"M={r}" for r in rows) + " |", "|---|" + "---:|" * len(rows)]
            for layer in dict.fromkeys(c["layer"] for c in cells):
                row = {c["rows"]: c for c in cells if c["layer"] == layer}
                lines.append(f"| {layer} {row[rows[0]]['in']}->{row[rows[0]]['out']} | " + " | ".join(
                    f"{row[r]['packed_ms']:.3f} -> {row[r]['stored_ms']:.3f} ({row[r]['stored_over_packed']:.2f}x)"
                    for r in rows) + " |")
            lines.append("")
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--rows", nargs="+", type=int, default=ROWS)
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold-mb", type=float, default=96.0, help="nibbles cycled through per shape (MiB)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "group_gemm_stored_cpu")
    args = parser.parse_args()
    from compressdit.quant.cpu_native import group_gemm_isa

    isa = group_gemm_isa()
    if isa is None or (isa == "avx2" and "w4a8-g64" in args.kinds):
        sys.exit(f"group_gemm_stored: {'w4a8-g64 stored runs on AVX512-VNNI only' if isa else 'no group_gemm path'} "
                 f"(this CPU: {isa}; on AVX2: --kinds nvfp4 w8a8)")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    loadavg = [round(v, 2) for v in os.getloadavg()]
    cells = measure(args.kinds, args.rows, args.threads, args.rounds, args.cold_mb)
    meta = {"cpu": cpu_model(), "flags": cpu_flags(), "torch": torch.__version__, "machine": platform.machine(),
            "rounds": args.rounds, "started": started, "loadavg_start": loadavg,
            "args": " ".join(sys.argv[1:])}
    write_results(args.out, {"meta": meta, "cells": cells}, write_markdown)


if __name__ == "__main__":
    main()
