"""Interleaved A/B of the CPU time per guided denoising step (cond + uncond, batch 8, t = 500): the dense model, its
Dense2MoE conversions and width-pruned peers, at 1 and 2 threads, in one process.

    PYTHONPATH=$PWD OMP_NUM_THREADS=2 python bench/moe_step_time.py --out bench/results/moe_step_time_dit_fmnist \
        --model dense=zoo:dit-fmnist --model dense2moe-50=RUNS/dit-d2m50/out --model width-ffn-50=RUNS/dit-w50/out \
        --pytorch-path dense2moe-50

Conditions: classes 0-7 (class-conditioned models) or one evaluation caption per class (text-conditioned ones, e.g.
flux-fmnist). Every round runs ``--calls`` guided calls of each model in turn (order rotated per round); the medians
over rounds of process CPU ms per call (all threads of this process: what a busy shared machine disturbs least) and
wall ms are reported, with each model's ratio to the first. ``--pytorch-path NAME`` adds ``NAME (PyTorch path)``:
the same checkpoint without the fused CPU pass of :mod:`compressdit.moe.cpu_native` (and records whether both give
equal outputs on the step at each thread count). ``--before NAME`` adds ``NAME (before)``: the same checkpoint run by
the grouped execution of commit ce83035 (per expert: module call, own gather and ``index_add_``), kept below as
:class:`BeforeMoE` so that old and new execution are compared in the same run. ``--synthetic WIDTH`` adds a
dit-fmnist-shaped dense model of that width with random weights and its ``dense2moe-50`` / ``width-ffn-50``
conversions (no distillation: only their speed is read). Machine, thread counts and load averages are recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import compressdit  # noqa: F401  (rebuilds MoE / pruned layers in stock from_pretrained)
from compressdit.evaluate.engine import evaluation_conditions
from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.models.sampling import guided_prediction, initial_latents
from compressdit.moe.layers import MoEFeedForward, activated_parameters, moe_layers


class BeforeMoE(MoEFeedForward):
    """The grouped execution before this change: per expert a module call on its own ``index_select`` and its
    own ``index_add_`` into the shared expert's output."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        chosen = self.router(x).topk(self.top_k, dim=-1).indices  # inference only: unit gates skipped
        out = self.shared(x) + self.bias
        flat = chosen.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        for expert, tokens in zip(self.experts, (order // chosen.shape[-1]).split(counts)):
            if len(tokens):
                out.index_add_(0, tokens, expert(x.index_select(0, tokens)))
        return out.reshape(*shape[:-1], self.layout.dim_out)


class PyTorchPathMoE(MoEFeedForward):
    """The layer without its fused CPU pass (:mod:`compressdit.moe.cpu_native`): the grouped PyTorch path."""

    def _native(self, x: torch.Tensor, weights) -> None:
        return None


def pytorch_path_copy(model: torch.nn.Module) -> torch.nn.Module:
    old = copy.deepcopy(model)
    for layer in moe_layers(old).values():
        layer.__class__ = PyTorchPathMoE
    return old


def before_copy(model: torch.nn.Module) -> torch.nn.Module:
    old = copy.deepcopy(model)
    for layer in moe_layers(old).values():
        if layer.shared is None or layer.bias is None or layer.layout.gating != "unit":
            raise SystemExit("--before: BeforeMoE covers unit-gated layers with a shared expert and a bias")
        layer.__class__ = BeforeMoE
    return old


def synthetic(width: int) -> dict[str, torch.nn.Module]:
    """A dit-fmnist-shaped dense model of ``width`` (random weights) and its two FFN-halving conversions (the
    recipes' shapes; neurons split in index order and pruned by weight magnitude: only the speed is read)."""
    from compressdit.moe.dense2moe import Dense2MoEConfig, build_moe, layout_for, replace_ffn
    from compressdit.prune.width import WidthConfig, prune_width

    reference = load_source("zoo:dit-fmnist").transformer
    config = {k: v for k, v in reference.config.items() if not k.startswith("_") and k != "quantization_config"}
    config.update(num_attention_heads=width // config["attention_head_dim"])
    torch.manual_seed(0)
    dense = type(reference).from_config(config).eval()
    moe = copy.deepcopy(dense)
    recipe = Dense2MoEConfig(experts=7, shared_experts=1, top_k=3)
    for name, ffn in adapter_for(moe).feed_forwards(moe).items():
        layout = layout_for(ffn, recipe, name)
        chunks = torch.arange(ffn.up.out_features).split(layout.expert_hidden)
        replace_ffn(moe, name, ffn, build_moe(ffn, layout, torch.cat(chunks[:1]), list(chunks[1:])).eval())
    pruned = copy.deepcopy(dense)
    prune_width(pruned, adapter_for(pruned), WidthConfig(ffn_ratio=0.5, head_ratio=0.0, importance="magnitude"))
    return {f"dense w{width}": dense, f"dense2moe-50 w{width}": moe, f"width-ffn-50 w{width}": pruned}


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins, then sleeps)")}


def measure(models: dict, rounds: int, calls: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    inputs = {}
    for name, model in models.items():
        adapter = adapter_for(model)
        x = initial_latents(adapter, model, 8, seed=0)
        inputs[name] = (adapter, model, x, adapter.encode(model, evaluation_conditions(adapter, 8)[0]),
                        adapter.encode(model, adapter.null_conditions(8)))
        for _ in range(3):  # warm-up
            guided_prediction(*inputs[name][:3], torch.tensor([500]), *inputs[name][3:], 4.0)
    cpu = {name: [] for name in models}
    wall = {name: [] for name in models}
    load = [os.getloadavg()[0]]
    names = list(models)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            adapter, model, x, cond, uncond = inputs[name]
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(calls):
                guided_prediction(adapter, model, x, torch.tensor([500]), cond, uncond, 4.0)
            wall[name].append((time.perf_counter() - started) / calls * 1e3)
            cpu[name].append((time.process_time() - cpu_started) / calls * 1e3)
        load.append(os.getloadavg()[0])
    first = names[0]
    base_cpu, base_wall = statistics.median(cpu[first]), statistics.median(wall[first])
    return {"load_average_1min": {"min": min(load), "max": max(load)},
            "models": {name: {"cpu_ms_median": round(statistics.median(cpu[name]), 2),
                              "cpu_ms_min": round(min(cpu[name]), 2),
                              "wall_ms_median": round(statistics.median(wall[name]), 2),
                              "wall_ms_min": round(min(wall[name]), 2),
                              "cpu_ratio_to_first": round(statistics.median(cpu[name]) / base_cpu, 3),
                              "wall_ratio_to_first": round(statistics.median(wall[name]) / base_wall, 3),
                              "cpu_min_ratio_to_first": round(min(cpu[name]) / min(cpu[first]), 3)}
                       for name in names}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="NAME=SOURCE (first: the reference)")
    parser.add_argument("--before", default=None, help="NAME of a MoE model to also run with the old execution")
    parser.add_argument("--pytorch-path", action="append", default=[],
                        help="NAME of a MoE model to also run without the fused CPU pass")
    parser.add_argument("--synthetic", type=int, action="append", default=[], help="width of a random DiT")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", required=True, help="path stem: writes STEM.json")
    args = parser.parse_args()
    models = {}
    for spec in args.model:
        name, source = spec.split("=", 1)
        models[name] = load_source(source).transformer.eval()
    if args.before:
        models[f"{args.before} (before)"] = before_copy(models[args.before])
    for name in args.pytorch_path:
        models[f"{name} (PyTorch path)"] = pytorch_path_copy(models[name])
    for width in args.synthetic:
        models.update(synthetic(width))
    result = {"machine": machine(), "rounds": args.rounds, "calls_per_round": args.calls,
              "step": "guided (cond + uncond), batch 8, t = 500, guidance 4",
              "parameters": {name: {"total": sum(p.numel() for p in m.parameters()),
                                    "activated_per_token": activated_parameters(m)} for name, m in models.items()},
              "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with torch.no_grad():
        if args.before:
            new, old = models[args.before], models[f"{args.before} (before)"]
            adapter = adapter_for(new)
            x = initial_latents(adapter, new, 8, seed=0)
            cond = adapter.encode(new, evaluation_conditions(adapter, 8)[0])
            uncond = adapter.encode(new, adapter.null_conditions(8))
            a, b = (guided_prediction(adapter, m, x, torch.tensor([500]), cond, uncond, 4.0) for m in (new, old))
            result["new_vs_before_max_abs_diff"] = float((a - b).abs().max())
        for name in args.pytorch_path:
            new, old = models[name], models[f"{name} (PyTorch path)"]
            adapter = adapter_for(new)
            x = initial_latents(adapter, new, 8, seed=0)
            cond = adapter.encode(new, evaluation_conditions(adapter, 8)[0])
            uncond = adapter.encode(new, adapter.null_conditions(8))
            for threads in args.threads:
                torch.set_num_threads(threads)
                a, b = (guided_prediction(adapter, m, x, torch.tensor([500]), cond, uncond, 4.0) for m in (new, old))
                result[f"{name}_fused_vs_pytorch_path_equal_{threads}_threads"] = bool(torch.equal(a, b))
        for threads in args.threads:
            result[f"{threads}_threads"] = measure(models, args.rounds, args.calls, threads)
            print(json.dumps({threads: result[f"{threads}_threads"]}, indent=1), flush=True)
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = Path(args.out).with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
