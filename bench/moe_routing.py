"""Dense2MoE checkpoint facts on a class-conditional model: parameters (total vs activated per token), expert load
per sampling timestep (plot), router entropy, and a rough CPU time per guided denoising step at batch 8.

    PYTHONPATH=$PWD python bench/moe_routing.py --moe OUT/d2m50 --dense zoo:dit-fmnist --width OUT/width50 \
        --out bench/results/moe_dit_fmnist

Sampling uses the reference scheduler, 20 steps, guidance 4, seeds 0..N-1 (cond + uncond halves both routed).
Timing is the median of ``--repeats`` guided calls (cond + uncond batch of 2 x 8) per model, interleaved; on a
shared machine it is noisy: read it as a ratio from one run, not as a speed claim.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import compressdit  # noqa: F401  (rebuilds MoE / pruned layers in stock from_pretrained)
from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.models.sampling import guided_prediction, initial_latents, sample
from compressdit.moe.layers import activated_parameters, moe_layers
from compressdit.moe.usage import ExpertLoad, capture_routing


def expert_load(source, samples: int, steps: int, guidance: float) -> ExpertLoad:
    model, adapter = source.transformer, adapter_for(source.transformer)
    load = ExpertLoad()
    classes = model.config.get("num_embeds_ada_norm") or 10
    conditions = [i % min(classes, 10) for i in range(samples)]
    with capture_routing(model) as records:
        def on_step(i, t, latents, prediction):
            load.add(records, t.reshape(1).expand(2 * len(latents)))  # cond + uncond halves
            records.clear()

        sample(adapter, model, conditions, source.scheduler or adapter.scheduler(model), steps=steps,
               guidance=guidance, seed=0, on_step=on_step, batch_size=samples)
    return load


def step_times(models: dict, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per guided call (cond + uncond) at ``batch``, models interleaved per repeat."""
    times: dict[str, list[float]] = {name: [] for name in models}
    inputs = {}
    for name, model in models.items():
        adapter = adapter_for(model)
        x = initial_latents(adapter, model, batch, seed=0)
        cond = adapter.encode(model, list(range(batch)))
        uncond = adapter.encode(model, adapter.null_conditions(batch))
        inputs[name] = (adapter, x, cond, uncond)
        guided_prediction(adapter, model, x, torch.tensor([500]), cond, uncond, 4.0)  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            adapter, x, cond, uncond = inputs[name]
            started = time.perf_counter()
            guided_prediction(adapter, model, x, torch.tensor([500]), cond, uncond, 4.0)
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) for name, t in times.items()}


def plot(fractions: dict[str, list[list[float]]], path: Path, layers: list[str]) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(layers), 3.2), dpi=100)
    for k, name in enumerate(layers):
        ax = fig.add_subplot(1, len(layers), k + 1)
        shares = torch.tensor(fractions[name])  # [bins, experts]
        image = ax.imshow(shares.T, aspect="auto", origin="lower", cmap="viridis", vmin=0,
                          extent=(0, 1000, -0.5, shares.shape[1] - 0.5))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("timestep")
        ax.set_ylabel("routed expert")
        fig.colorbar(image, ax=ax, label="share of assignments")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--moe", required=True)
    parser.add_argument("--dense", default="zoo:dit-fmnist")
    parser.add_argument("--width", default=None, help="width-pruned checkpoint at the same activated parameters")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sources = {"dense": load_source(args.dense), "moe": load_source(args.moe)}
    if args.width:
        sources["width"] = load_source(args.width)
    models = {name: s.transformer.eval() for name, s in sources.items()}
    params = {name: {"total": sum(p.numel() for p in m.parameters()), "activated": activated_parameters(m)}
              for name, m in models.items()}
    load = expert_load(sources["moe"], args.samples, args.steps, 4.0)
    seconds = step_times(models, args.batch, args.repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(moe_layers(models["moe"]))
    plot(load.fractions(), out.with_suffix(".png"), list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]])))
    result = {"parameters": params, "expert_load": load.summary(), "expert_load_per_layer": load.fractions(),
              "seconds_per_guided_step_batch8": seconds, "threads": args.threads, "samples": args.samples,
              "steps": args.steps, "note": "CPU timing on a shared 2-core machine: noisy, one run"}
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "expert_load_per_layer"}, indent=1))


if __name__ == "__main__":
    main()
