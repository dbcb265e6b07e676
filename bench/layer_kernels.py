"""CPU per-layer speed of our quantized-linear kernels against fp32, bf16, fbgemm, torchao and bitsandbytes.

DiT-XL/2 linear shapes (1152->3456 qkv, 1152->1152 out, 1152->4608 fc1, 4608->1152 fc2) at M = 1, 16, 64, 256,
1024 rows, with 1 and 2 threads. Every method of a (shape, M, threads) cell is timed in the same run, in an
interleaved order repeated ``--rounds`` times, and the ratio to fp32 is taken per round; the table reports the
median time and the median ratio. Random weights: this measures speed, never quality. Usage::

    python bench/layer_kernels.py            # writes bench/results/layer_kernels_cpu.{json,md}
    python bench/layer_kernels.py --quick    # 1152->4608 only, M = 1 and 256, 1 thread
    python bench/layer_kernels.py --methods w8a8 fbgemm --rows 1 16 256 --out bench/results/layer_w8a8_cpu
    python bench/layer_kernels.py --shapes zoo --methods w8a8 fbgemm --rows 16 256 --out bench/results/layer_w8a8_zoo_cpu
    python bench/layer_kernels.py --methods lrq --rows 16 256 1024 --out bench/results/layer_lrq_cpu

``--methods`` keeps the methods whose name contains one of the words (fp32 always runs); ``--shapes zoo`` times
the zoo reference models' linear shapes instead (dit-fmnist: 128->128 qkv/out, 128->512 fc1, 512->128 fc2,
128->768 adaLN; 256 rows at batch 8 with CFG, 16 for adaLN).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
SHAPES = [("attn.qkv", 1152, 3456), ("attn.to_out", 1152, 1152), ("ff.fc1", 1152, 4608), ("ff.fc2", 4608, 1152)]
ZOO_SHAPES = [("attn.to_q", 128, 128), ("ff.fc1", 128, 512), ("ff.fc2", 512, 128), ("adaLN", 128, 768)]
ROWS = [1, 16, 64, 256, 1024]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(out: Path, result: dict, write_markdown) -> None:
    """``result`` (its ``meta`` stamped with the load average now) as ``out``.json, and its markdown as ``out``.md
    (``write_markdown(result, path)``)."""
    result["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    print(f"wrote {out.with_suffix('.json')} and .md")


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]


def _without_native(layer, x):
    """``layer(x)`` on the PyTorch path of :mod:`compressdit.quant.cpu_native` (as without a C compiler)."""
    from compressdit.quant import cpu_native

    library = cpu_native.native_library
    cpu_native.native_library = lambda: None
    try:
        return layer(x)
    finally:
        cpu_native.native_library = library


#: low-bit activation recipes' layer specs (``recipes/rtn-w4a4.yaml``, ``svdquant-w4a4.yaml``'s residual, ``nvfp4.yaml``,
#: ``lrq-w4a4.yaml`` with the randomized Hadamard, which its ARS picks or DuQuant per layer)
LOW_BIT = {"w4a4 g16": dict(w_bits=4, group_size=16, a_bits=4, a_granularity="per_group", a_group_size=16),
           "w4a4 g64": dict(w_bits=4, group_size=64, a_bits=4, a_granularity="per_group", a_group_size=64),
           "nvfp4": dict(format="nvfp4", w_bits=4, a_bits=4, a_format="nvfp4", a_granularity="per_group"),
           "lrq w4a4": dict(format="twinlog", w_bits=4, a_bits=4, a_granularity="per_group", a_group_size=16,
                            balance=0.5, rotation="hadamard")}


def low_bit(linear, fields: dict, decoded: bool = False, kernel: str | None = None) -> tuple:
    """(layer, note) of a low-bit spec on its chosen kernel, or (``decoded``) on the decoded-weight kernel the CPU
    ran before ``cpu-int-groups`` (``cpu-decoded-dense`` / ``cpu-decoded-bf16``), or on ``kernel``."""
    from compressdit.quant.cpu_dense import decoded_kernel_name
    from compressdit.quant.formats import FORMATS
    from compressdit.quant.kernel_registry import refresh, set_kernel
    from compressdit.quant.spec import LinearQuantSpec

    spec = LinearQuantSpec.from_dict(dict(fields), "spec")
    FORMATS.get(spec.format).validate_spec(spec, "spec")
    gen = torch.Generator().manual_seed(0)
    absmax = None if spec.balance is None else torch.rand(linear.in_features, generator=gen) + 0.5
    layer = FORMATS.get(spec.format).quantize(linear, spec, absmax)
    if decoded or kernel:
        set_kernel(layer, kernel or decoded_kernel_name(spec, (linear.out_features, linear.in_features)))
    refresh(layer)
    return layer, f"{spec.label}: {layer.kernel_name}"


def duquant_methods(linear) -> dict:
    """LRQ W4A4 layers with DuQuant's rotation (what ``lrq-w4a4``'s ARS picks for layers with channel outliers): fitted
    to an absmax with salient channels (the greedy steps spread them: several steps a block), and to a flat one (no
    step: the rotation is its permutation, as on the zoo's and a PixArt's calibrated DuQuant layers); the first also
    with the rotation as the reference's dense blocks, the CPU kernels' path before the C pass
    (``cpu_dense.rotated_rows`` off while it prepacks)."""
    import copy

    from compressdit.quant import cpu_dense
    from compressdit.quant.kernel_registry import refresh
    from compressdit.quant.spec import LinearQuantSpec
    from compressdit.quant.twinlog_layer import TwinLogLinear

    spec = LinearQuantSpec.from_dict({**LOW_BIT["lrq w4a4"], "rotation": "duquant"}, "spec")
    gen = torch.Generator().manual_seed(0)
    flat = torch.rand(linear.in_features, generator=gen) + 0.5
    salient = flat.clone()
    salient[torch.randperm(linear.in_features, generator=gen)[:max(2, linear.in_features // 64)]] *= 40
    methods = {}
    notes = {"ours lrq w4a4 duquant": "fitted to an absmax with 1 in 64 channels 40x the rest (the greedy steps a "
                                      "block of R1 and R2 are under each table)",
             "ours lrq w4a4 duquant, no step": "fitted to a flat absmax: no step, the rotation its permutation"}
    for name, absmax in (("ours lrq w4a4 duquant", salient), ("ours lrq w4a4 duquant, no step", flat)):
        layer = TwinLogLinear.from_linear(linear, spec, absmax)
        refresh(layer)
        methods[name] = (layer, f"{spec.label}: {layer.kernel_name}, {notes[name]}; the C pass")
    dense = copy.deepcopy(methods["ours lrq w4a4 duquant"][0])
    pass_of, cpu_dense.rotated_rows = cpu_dense.rotated_rows, lambda layer, grid: None
    try:
        refresh(dense)
    finally:
        cpu_dense.rotated_rows = pass_of
    methods["ours lrq w4a4 duquant, dense rotation (before)"] = (
        dense, f"the first DuQuant layer rotating its input by the reference's dense blocks ({dense.kernel_name})")
    return methods


def build_methods(in_features: int, out_features: int, keep: list[str] | None = None) -> dict:
    """name -> (callable taking x, note). Ours run through QuantLinear/VQLinear with their chosen kernel."""
    from compressdit.evaluate.peers import _bnb_int8, _bnb_nf4
    from compressdit.quant.cpu_native import group_gemm_isa
    from compressdit.quant.kernel_registry import refresh, set_kernel
    from compressdit.quant.layers import QuantLinear
    from compressdit.quant.spec import LinearQuantSpec
    from compressdit.quant.vq_layer import VQLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features)
    bf16 = torch.nn.Linear(in_features, out_features).to(torch.bfloat16)
    methods = {"fp32": (linear, "F.linear fp32"), "bf16": (lambda x: bf16(x.bfloat16()), "F.linear bf16")}

    def ours(spec, name, force=None):
        layer = QuantLinear.from_linear(linear, spec)
        if force:
            set_kernel(layer, force)
        refresh(layer)
        return layer, f"{spec.label}: {layer.kernel_name}"

    w8a8 = LinearQuantSpec(w_bits=8, a_bits=8)
    methods["ours w8a8 (per-token)"] = ours(w8a8, "w8a8")
    layer_w8a8 = methods["ours w8a8 (per-token)"][0]
    balanced = QuantLinear.from_linear(linear, LinearQuantSpec(w_bits=8, a_bits=8, balance=0.5),
                                       input_absmax=torch.rand(in_features) * 4 + 0.1)
    refresh(balanced)
    methods["ours w8a8 balanced (per-token)"] = (balanced, f"{balanced.spec.label}: {balanced.kernel_name} "
                                                           "(the w8a8 recipe's channel balancing, fused)")
    methods["ours w8a8 torch passes (no C)"] = (
        lambda x: _without_native(layer_w8a8, x),
        "the same layer with the activation quantization and epilogue as PyTorch ops (no compiler)")
    methods["ours w8a8 per-tensor"] = ours(LinearQuantSpec(w_bits=8, a_bits=8, a_granularity="per_tensor"), "w8pt")
    methods["ours w8a8 before (reference)"] = ours(w8a8, "w8ref", "reference")
    for group in (32, 64, 128):
        methods[f"ours w4a16 g{group}"] = ours(LinearQuantSpec(w_bits=4, group_size=group), f"w4g{group}")
    w4 = LinearQuantSpec(w_bits=4, group_size=64)
    methods["ours w4a16 g64 before (reference)"] = ours(w4, "w4ref", "reference")
    raw, _ = ours(w4, "w4raw")
    scale = raw.weight_scale.float()  # torch's packed int4 GEMM on the same codes (the kernel's path before int4_dot)
    int4_packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((raw.codes().to(torch.int32) + 8).contiguous(),
                                                                     1)
    int4_scales = torch.stack([scale.t(), torch.zeros_like(scale).t()], -1).to(torch.bfloat16).contiguous()
    methods["int4pack_mm g64 at every M"] = (
        lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x.bfloat16(), int4_packed, 64, int4_scales).float()
        + raw.bias,
        "_weight_int4pack_mm_for_cpu, bf16 activations, no row threshold (cpu-int4-weight's path up to 64 rows "
        "before int4_dot)")
    methods["ours w8a16"] = ours(LinearQuantSpec(w_bits=8), "w8a16")
    for name, fields in {"w4a8 (per channel)": dict(w_bits=4, a_bits=8), "w4a8 g64": dict(w_bits=4, a_bits=8,
                                                                                         group_size=64)}.items():
        # the w4a8 / rtn-w4a8 recipes' layers; before: the packed int4 GEMM on fake-quantized activations
        methods[f"ours {name}"] = ours(LinearQuantSpec(**fields), name)
        methods[f"ours {name} on cpu-int4-weight (before)"] = ours(LinearQuantSpec(**fields), name, "cpu-int4-weight")
    for name, fields in LOW_BIT.items():  # cpu-int-groups where the CPU has it; the decoded kernels it replaced
        methods[f"ours {name}"] = low_bit(linear, fields)
        methods[f"ours {name} decoded (before)"] = low_bit(linear, fields, decoded=True)
    methods.update(duquant_methods(linear))
    if group_gemm_isa() == "avx512-vnni":  # the twin-log integer GEMM where the bf16 copy's GEMM keeps the layer
        methods["ours lrq w4a4 on cpu-twinlog-groups"] = low_bit(linear, LOW_BIT["lrq w4a4"],
                                                                 kernel="cpu-twinlog-groups")
    vq_spec = LinearQuantSpec(format="vq", w_bits=3, vector_dim=2, codebook_size=64)
    vq = VQLinear(in_features, out_features, True, vq_spec)
    vq.load_codes(torch.randint(0, 64, (out_features, in_features // 2)), torch.randn(64, 2) * 0.02)
    methods["ours vq-w3 (d2 k64)"] = (vq, f"{vq_spec.label}: {vq.kernel_name}")
    vq_ref = VQLinear(in_features, out_features, True, vq_spec)
    vq_ref.load_state_dict(vq.state_dict())
    set_kernel(vq_ref, "reference")
    methods["ours vq-w3 before (reference)"] = (vq_ref, "vq_linear reference: decode per call")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scale = linear.weight.detach().abs().amax(1) / 127
        codes = torch.round(linear.weight.detach() / scale[:, None]).to(torch.int8)
        qweight = torch._make_per_channel_quantized_tensor(codes, scale.double(),
                                                           torch.zeros(out_features, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qweight, linear.bias.detach())
    methods["fbgemm dynamic int8"] = (lambda x: torch.ops.quantized.linear_dynamic(x, packed, False),
                                      "quantized::linear_dynamic: per-tensor asymmetric uint8 activations")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

        for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                             ("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig())):
            module = torch.nn.Sequential(torch.nn.Linear(in_features, out_features))
            module.load_state_dict({"0." + k: v for k, v in linear.state_dict().items()})
            quantize_(module, config)
            methods[name] = (module, type(config).__name__)
    except Exception as error:  # noqa: BLE001 - a peer that does not run is reported, not fatal
        methods["torchao"] = (None, f"did not run: {error}")
    for name, make in (("bitsandbytes int8", _bnb_int8), ("bitsandbytes nf4", _bnb_nf4)):
        try:
            module = make(linear)
            module(torch.randn(2, in_features))
            methods[name] = (module, type(module).__name__)
        except Exception as error:  # noqa: BLE001
            methods[name] = (None, f"did not run on CPU: {error}")
    if keep:
        methods = {n: m for n, m in methods.items() if n == "fp32" or any(word in n for word in keep)}
    return methods


def time_cell(methods: dict, rows: int, in_features: int, rounds: int, budget_s: float) -> dict:
    x = torch.randn(rows, in_features)
    runnable = {n: f for n, (f, _) in methods.items() if f is not None}
    for fn in runnable.values():  # warm-up (prepacks, oneDNN primitive caches)
        fn(x)
    first = {}
    for name, fn in runnable.items():
        started = time.perf_counter()
        fn(x)
        first[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {n: [] for n in runnable}
    ratios: dict[str, list[float]] = {n: [] for n in runnable}
    for _ in range(rounds):
        this_round = {}
        for name, fn in runnable.items():
            repeats = max(1, min(20, int(budget_s / max(first[name], 1e-5) / rounds)))
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                fn(x)
                samples.append(time.perf_counter() - started)
            this_round[name] = min(samples)
            times[name].append(this_round[name] * 1e3)
        for name in runnable:
            ratios[name].append(this_round["fp32"] / this_round[name])
    return {n: {"ms": round(statistics.median(times[n]), 4), "speedup_vs_fp32": round(statistics.median(ratios[n]), 3),
                "ms_spread": [round(min(times[n]), 4), round(max(times[n]), 4)]} for n in runnable}


def _steps(methods: dict) -> dict:
    """The greedy steps a block of the salient DuQuant layer's rotation (``{}`` where it was not built)."""
    layer = methods.get("ours lrq w4a4 duquant", (None,))[0]
    if layer is None:
        return {}
    return {"duquant_steps_per_block": round(float(layer.rotation_steps().counts.float().mean()), 2)}


def write_markdown(result: dict, path: Path) -> None:
    meta = result["meta"]
    lines = [f"# CPU per-layer kernels: {meta['cpu']} ({', '.join(meta['cpu_flags'])}), torch {meta['torch']}", "",
             f"Median of {meta['rounds']} interleaved rounds (each the best of a few calls); speed-up = fp32 time / "
             "method time within the same round, median over rounds. Load average before/after: "
             f"{meta['loadavg_start']} / {meta['loadavg_end']} (other jobs shared the cores).", ""]
    for threads, cells in result["threads"].items():
        for shape in cells:
            lines.append(f"## {shape['layer']} {shape['in']}->{shape['out']}, {threads} thread(s)")
            lines.append("")
            header = "| method | " + " | ".join(f"M={m} ms (x fp32)" for m in shape["rows"]) + " |"
            lines += [header, "|---|" + "---:|" * len(shape["rows"])]
            for name in shape["methods"]:
                cells_text = []
                for m in shape["rows"]:
                    cell = shape["cells"][str(m)].get(name)
                    cells_text.append("—" if cell is None else f"{cell['ms']:.3f} ({cell['speedup_vs_fp32']:.2f}x)")
                lines.append(f"| {name} | " + " | ".join(cells_text) + " |")
            if "duquant_steps_per_block" in shape:
                lines += ["", f"DuQuant (salient absmax): {shape['duquant_steps_per_block']} greedy steps a block."]
            lines.append("")
    lines.append("## Methods")
    lines.append("")
    lines += [f"- **{name}**: {note}" for name, note in result["notes"].items()]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per method and cell (approx.)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "layer_kernels_cpu")
    parser.add_argument("--methods", nargs="+", help="keep methods whose name contains one of these words")
    parser.add_argument("--rows", type=int, nargs="+", default=ROWS)
    parser.add_argument("--shapes", choices=["dit-xl", "zoo"], default="dit-xl")
    args = parser.parse_args()
    shapes, rows = (SHAPES[2:3], [1, 256]) if args.quick else (SHAPES if args.shapes == "dit-xl" else ZOO_SHAPES,
                                                                   args.rows)
    threads = [1] if args.quick else args.threads
    result = {"meta": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__,
                       "machine": platform.machine(), "rounds": args.rounds,
                       "loadavg_start": [round(v, 2) for v in os.getloadavg()]}, "threads": {}, "notes": {}}
    for count in threads:
        torch.set_num_threads(count)
        result["threads"][str(count)] = []
        for layer, in_features, out_features in shapes:
            with torch.no_grad():
                methods = build_methods(in_features, out_features, args.methods)
                result["notes"].update({n: note for n, (_, note) in methods.items()})
                cells = {str(m): time_cell(methods, m, in_features, args.rounds, args.budget) for m in rows}
            result["threads"][str(count)].append({"layer": layer, "in": in_features, "out": out_features, "rows": rows,
                                                  "methods": list(methods), "cells": cells, **_steps(methods)})
            print(f"{count} thread(s) {layer}: done (load {os.getloadavg()[0]:.2f})", flush=True)
    write_results(args.out, result, write_markdown)


if __name__ == "__main__":
    main()
