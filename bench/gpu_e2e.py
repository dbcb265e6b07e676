"""Time per denoising step of DiT-XL/2 (random weights, 256 px) in bf16 vs W8A8, FP8 and int4 weight-only.

One step = one transformer forward on the classifier-free-guidance batch (batch 8 -> 16 rows of 32 x 32
latents, 256 tokens each). Variants (RTN, embedders and head in bf16, as in recipes/rtn-w8a8.yaml):

- ``bf16``; ``w8a8`` / ``int4`` / ``fp8``: the shipped layers (``QuantLinear``, ``FP8Linear``) with the kernel
  the registry picks by default (what users get: ``cuda-w8a8-int8``, ``cuda-int4-weight``, ``cuda-fp8`` on
  CUDA; the row's ``kernel`` says which), prepacked before timing and before ``torch.compile``;
- ``w8a8-triton``, ``w8a8-cublas``, ``int4-tinygemm``: the same quantized layers executed directly through
  :func:`compressdit.quant.gpu_ops.kernel_for_spec` (``prepare`` once, then the custom op), one backend each.

Each result is one JSON line appended to ``--append``; ``--report FILE.jsonl`` writes gpu_e2e.{json,md}.
Random weights: speed only; ``rel_err`` is the output's distance to the bf16 model's (same weights, inputs).
Usage::

    python bench/gpu_e2e.py --variants bf16 w8a8-triton fp8 --append $OUT/gpu_e2e.jsonl    # eager
    python bench/gpu_e2e.py --compile --variants bf16 --append $OUT/gpu_e2e.jsonl          # torch.compile
    python bench/gpu_e2e.py --report $OUT/gpu_e2e.jsonl                                    # json + md
    python bench/gpu_e2e.py --device cpu --quick --variants bf16 w8a8-cublas fp8 int4-tinygemm --append /tmp/e.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_timing import error_text, fmt_ms, machine, machine_line, median_ms, out_dir, write_json  # noqa: E402

DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
TINY = dict(DIT_XL_2, num_attention_heads=2, attention_head_dim=64, num_layers=2, sample_size=8)
SPECS = {"w8a8": {"w_bits": 8, "a_bits": 8, "a_granularity": "per_token"},
         "fp8": {"format": "fp8", "w_bits": 8, "a_bits": 8},
         "int4": {"w_bits": 4, "group_size": 128, "w_symmetric": False}}
VARIANTS = {"bf16": (None, None), "w8a8": ("w8a8", None), "w8a8-triton": ("w8a8", "triton"),
            "w8a8-cublas": ("w8a8", "cublas"), "fp8": ("fp8", None), "int4": ("int4", None),
            "int4-tinygemm": ("int4", "tinygemm")}


class KernelLinear(nn.Module):
    """A quantized layer run through a ``GpuKernel``: its prepared tensors as non-persistent buffers."""

    def __init__(self, layer: nn.Module, kernel) -> None:
        super().__init__()
        self.kernel = kernel
        self.prepared_names = []
        for name, tensor in kernel.prepare(layer).items():
            self.register_buffer(name, tensor, persistent=False)
            self.prepared_names.append(name)
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x, {name: getattr(self, name) for name in self.prepared_names}, self.bias)


def build_model(device: torch.device, quick: bool, sample_size: int = 32) -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = DiTTransformer2DModel(**(TINY if quick else dict(DIT_XL_2, sample_size=sample_size)))
    with torch.no_grad():  # non-zero adaLN gates and uneven rows, like a trained model's
        for p in model.parameters():
            p.normal_(0, 0.02).mul_(1 + torch.rand(p.shape[0], *[1] * (p.dim() - 1), device=device))
    return model.to(torch.bfloat16).eval()


def step_inputs(model: nn.Module, batch: int, device: torch.device) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(1)
    size = model.config.sample_size
    rows = 2 * batch  # classifier-free guidance: conditional + unconditional rows
    return {"hidden_states": torch.randn(rows, 4, size, size, generator=gen).to(device, torch.bfloat16),
            "timestep": torch.full((rows,), 500, device=device),
            "class_labels": torch.cat([torch.arange(batch) % 1000, torch.full((batch,), 1000)]).to(device)}


def quantize(model: nn.Module, scheme: str, kernel_kind: str | None, device: torch.device) -> dict:
    """RTN-quantize ``model`` in place with ``scheme``; with ``kernel_kind`` swap layers for :class:`KernelLinear`."""
    from compressdit.models import adapter_for
    from compressdit.quant.gpu_ops import kernel_for_spec
    from compressdit.quant.spec import LinearQuantSpec
    from compressdit.quant.transform import LayerRule, quantize_layers, quantized_modules, resolve_plan, set_module

    spec = LinearQuantSpec.from_dict(dict(SPECS[scheme]), scheme)
    rules = [LayerRule("role:embedder", None), LayerRule("role:head", None), LayerRule("re:.*", spec)]
    quantize_layers(model, resolve_plan(model, adapter_for(model), rules))
    layers = quantized_modules(model)
    info = {"quantized_layers": len(layers), "kernel": None}
    if kernel_kind is None:  # the registry's default: prepacked now, so a compiled model runs it too
        from compressdit.quant.kernel_registry import kernel_summary, prepack_model

        prepack_model(model)
        info["kernel"] = kernel_summary(model)
        return info
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)
    backend = kernel_kind if kernel_kind in ("triton", "cublas") else None
    for name, layer in layers.items():
        kernel = kernel_for_spec(layer.spec, layer.in_features, layer.out_features, capability, backend)
        if kernel is None:
            raise RuntimeError(f"no GPU kernel for {name} ({layer.spec.label}, {layer.in_features} -> "
                               f"{layer.out_features})")
        set_module(model, name, KernelLinear(layer, kernel))
        info["kernel"] = kernel.name
    return info


def mode_of(args) -> str:
    """How a step runs: eager, compile (regional torch.compile), cuda graph, or compile+graph."""
    mode = {(False, False): "eager", (True, False): "compile", (False, True): "cuda graph",
            (True, True): "compile+graph"}[(bool(args.compile), bool(args.graph))]
    mode = mode if not args.compile_mode else f"{mode} ({args.compile_mode})"
    return mode if getattr(args, "sample_size", 32) == 32 else f"{mode}, {8 * args.sample_size} px"


def run_variant(base: nn.Module, reference: torch.Tensor, inputs: dict, name: str, args, device) -> dict:
    scheme, kernel_kind = VARIANTS[name]
    row = {"variant": name, "compiled": mode_of(args), "batch": args.batch, "rows": 2 * args.batch,
           "px": 8 * args.sample_size}
    model = copy.deepcopy(base) if scheme else base
    with torch.no_grad():
        if scheme:
            row.update(quantize(model, scheme, kernel_kind, device))
        if args.compile:  # regional: the 28 identical blocks share one compiled graph (compiles ~28x less code)
            for block in model.transformer_blocks:
                block.compile(fullgraph=True, mode=args.compile_mode)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        out = model(**inputs, return_dict=False)[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["first_call_s"] = round(time.perf_counter() - started, 2)  # includes compilation when compiled
        row["rel_err"] = float((out.float() - reference).norm() / reference.norm())
        if args.graph:  # one CUDA graph replays the whole step: the GPU time without host launch overhead
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(args.warmup):
                    model(**inputs, return_dict=False)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(**inputs, return_dict=False)
            row["ms_per_step"] = median_ms(graph.replay, device, args.warmup, args.repeats)
        else:
            row["ms_per_step"] = median_ms(lambda: model(**inputs, return_dict=False), device, args.warmup,
                                           args.repeats)
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    print(f"[gpu_e2e] {name} {row['compiled']}: "
          f"{row['ms_per_step']:.2f} ms/step, "
          f"rel err {row['rel_err']:.4f}, first call {row['first_call_s']} s", flush=True)
    return row


def measure(args) -> None:
    device = torch.device(args.device)
    import compressdit  # noqa: F401  (registers the formats)

    base = build_model(device, args.quick, args.sample_size)
    inputs = step_inputs(base, args.batch, device)
    with torch.no_grad():
        reference = base(**inputs, return_dict=False)[0].float()
    meta = machine(device)
    meta.update(model=f"DiT-XL/2 ({8 * args.sample_size}px, random weights)" if not args.quick else "tiny DiT (smoke test)",
                warmup=args.warmup, repeats=args.repeats)
    path = Path(args.append)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        try:
            row = run_variant(base, reference, inputs, name, args, device)
        except Exception as error:  # noqa: BLE001 -- one failing variant must not stop the others
            row = {"variant": name, "compiled": mode_of(args), "batch": args.batch, "error": error_text(error)}
            print(f"[gpu_e2e] {name} {row['compiled']} FAILED: {row['error']}", flush=True)
        with path.open("a") as f:
            f.write(json.dumps({"meta": meta, **row}) + "\n")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def report(jsonl: Path, out: Path) -> None:
    lines = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    if not lines:
        raise SystemExit(f"{jsonl} holds no results")
    meta = next((line["meta"] for line in reversed(lines) if "meta" in line), None)
    if meta is None:
        raise SystemExit(f"{jsonl} holds no measured run (every line is an error or a skip)")
    rows = [{k: v for k, v in line.items() if k != "meta"} for line in lines]
    base = {r["compiled"]: r["ms_per_step"] for r in rows if r["variant"] == "bf16" and "ms_per_step" in r}
    for r in rows:
        if "ms_per_step" in r and base.get(r["compiled"]):
            r["speedup_vs_bf16"] = round(base[r["compiled"]] / r["ms_per_step"], 3)
        eager = base.get("eager", base.get(False))
        if "ms_per_step" in r and eager:
            r["speedup_vs_bf16_eager"] = round(eager / r["ms_per_step"], 3)
    write_json(out / "gpu_e2e.json", {"meta": meta, "rows": rows})
    md = [f"# Time per denoising step: {meta['model']}, batch {rows[0]['batch']} guided "
          f"({2 * rows[0]['batch']} rows x 256 tokens at 256 px, x 1024 at 512 px), median of {meta['repeats']}", "",
          f"Machine: {machine_line(meta)}. RTN, embedders and head in bf16. Speed-up vs bf16 in the same mode "
          "(eager vs eager, compiled vs compiled, graph vs graph; torch.compile = regional, each transformer block; "
          "cuda graph = one captured step replayed, no host launch overhead; compile+graph = both: the GPU time of "
          "Inductor's fused kernels); rel err = |y - y_bf16| / |y_bf16| of the step's output.", "",
          "| variant | mode | ms per step | speed-up vs bf16 | vs bf16 eager | rel err | first call (s) | peak GiB |",
          "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mode = r["compiled"] if isinstance(r["compiled"], str) else "torch.compile" if r["compiled"] else "eager"
        mode = "torch.compile" if mode == "compile" else mode
        if "error" in r:
            md.append(f"| {r['variant']} | {mode} | error: `{r['error'][:160]}` | | | | | |")
            continue
        md.append(f"| {r['variant']}{' (' + r['kernel'] + ')' if r.get('kernel') else ''} | {mode} | "
                  f"{r['ms_per_step']:.2f} | {fmt_ms(r.get('speedup_vs_bf16'), 2)}x | "
                  f"{fmt_ms(r.get('speedup_vs_bf16_eager'), 2)}x | {r['rel_err']:.4f} | {r['first_call_s']} | "
                  f"{r.get('peak_mem_gib', '-')} |")
    (out / "gpu_e2e.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="a tiny DiT, 1 warmup, 2 repeats (smoke test)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile each transformer block (regional compilation; first_call_s includes it)")
    parser.add_argument("--compile-mode", default=None,
                        help="torch.compile mode (e.g. max-autotune-no-cudagraphs); default Inductor's default")
    parser.add_argument("--graph", action="store_true",
                        help="time one CUDA graph replay of the step (GPU time without host launch overhead)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (x2 rows for guidance)")
    parser.add_argument("--sample-size", type=int, default=32, help="latent size: 32 = 256 px, 64 = 512 px")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--append", default=None, help="JSON-lines file the results are appended to")
    parser.add_argument("--report", default=None, help="JSON-lines file to turn into gpu_e2e.{json,md}")
    parser.add_argument("--out", default=None, help="folder for the report (default $OUT, bench/results)")
    args = parser.parse_args()
    if args.report:
        return report(Path(args.report), out_dir(args.out))
    if args.quick:
        args.warmup, args.repeats = 1, 2
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench/gpu_e2e.py: no CUDA device is visible; use --device cpu --quick for a smoke test")
    args.append = args.append or str(out_dir(args.out) / "gpu_e2e.jsonl")
    measure(args)


if __name__ == "__main__":
    main()
