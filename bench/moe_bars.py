"""Dense2MoE bars on a zoo model (dit-fmnist, flux-fmnist): a distilled candidate (e.g. dense2moe-50) beside the
dense teacher and a baseline checkpoint (e.g. width-ffn-50 distilled with the same budget), one evaluation at
identical seeds (the report machinery: FD-FMNIST, class accuracy, PSNR to the dense samples), plus total and
activated parameters, the distillation budget (samples, steps, training seconds from the trainer's ``state.pt``
with ``--states``) and, for routed students, the expert (block) load per sampling timestep (table + plot in the
report) and the mean router entropy over ``--load-samples`` guided samples.

    PYTHONPATH=$PWD nice -n 15 python bench/moe_bars.py CANDIDATE_DIR BASELINE_DIR OUT_DIR --samples 500 \
        [--reference zoo:flux-fmnist] [--states CAND_STATE.pt BASE_STATE.pt] [--recipes C.yaml B.yaml]

CANDIDATE / BASELINE may also be a distillation checkpoint (``state.pt`` of the trainer's workdir, e.g. one saved
at the same step by both runs when they cannot finish in time): the student is rebuilt from the reference by the
shapes its state dict holds (MoE layouts with ``--top-k``, width-pruned linears), then loaded.

Writes OUT_DIR/report.{json,md,html} and OUT_DIR/bars.json (metrics by column, parameters, wall time).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from compressdit.cache import default_cache_dir
from compressdit.evaluate.engine import Entry, evaluation_conditions
from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.models.sampling import sample
from compressdit.moe.blocks import activated_parameters, group_routers
from compressdit.moe.layers import moe_layers
from compressdit.moe.usage import ExpertLoad, capture_routing
from compressdit.plots import plot_to_file
from compressdit.recipe import load_recipe
from compressdit.stages.distill import expert_load_table
from compressdit.stages.evaluate import EvaluateConfig, run_evaluation


def student_from_state(reference, path: str, top_k: int):
    """The reference's transformer reshaped to the student a trainer checkpoint holds, with its weights."""
    import copy
    import re

    from compressdit.io.save import record_structure
    from compressdit.io.structure import apply_structure
    from compressdit.models import adapter_for

    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = state["model"]
    model = copy.deepcopy(reference.transformer)
    ffns = adapter_for(model).feed_forwards(model)
    moe, width = {}, {}
    for key, tensor in weights.items():
        found = re.fullmatch(r"(.+)\.experts\.0\.up\.weight", key)
        if found:
            name = found.group(1)
            count = len({k.split(".experts.")[1].split(".")[0] for k in weights if k.startswith(name + ".experts.")})
            shared = weights.get(f"{name}.shared.up.weight")
            moe[name] = {"dim": tensor.shape[1], "dim_out": weights[f"{name}.experts.0.down.weight"].shape[0],
                         "experts": count, "expert_hidden": tensor.shape[0], "top_k": top_k,
                         "shared_hidden": 0 if shared is None else shared.shape[0],
                         "activation": ffns[name].activation, "bias": f"{name}.experts.0.up.bias" in weights}
    own = dict(model.named_modules())
    for key, tensor in weights.items():
        name = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and isinstance(own.get(name), torch.nn.Linear) and \
                list(tensor.shape) != list(own[name].weight.shape) and not any(name.startswith(m) for m in moe):
            width[name] = list(tensor.shape)
    mob = {}
    for key, tensor in weights.items():  # Mixture of Blocks: one router per group, [group, features]
        found = re.fullmatch(r"(\w+)\.0\.mob_router\.weight", key)
        if found:
            mob[found.group(1)] = {"blocks": len(getattr(model, found.group(1))), "group": tensor.shape[0],
                                   "active": top_k, "features": tensor.shape[1]}
    parallel = [ffns[name] for name in moe if ffns[name].down_offset]  # FLUX single blocks: fused proj_out
    apply_structure(model, {"moe": moe, "width": width, "mob": mob,
                            "tail_sum": {ffn.down_module: ffn.down_offset for ffn in parallel},
                            "identity": [ffn.activation_module for ffn in parallel]})
    model.load_state_dict(weights)
    record_structure(model)
    return model.eval(), state["step"]


def sampling_load(reference, model, samples: int, steps: int) -> ExpertLoad:
    """Expert (block) assignments of ``model`` per timestep bin while it samples ``samples`` balanced conditions
    (seed 0, guidance 4; the conditional and unconditional halves both counted)."""
    adapter = adapter_for(model)
    conditions, _ = evaluation_conditions(adapter, samples)
    load = ExpertLoad()
    with capture_routing(model) as records:
        def on_step(i, t, latents, prediction):
            load.add(records, t.reshape(1).float().expand(2 * len(latents)))
            records.clear()

        sample(adapter, model, conditions, reference.scheduler or adapter.scheduler(model), steps=steps,
               guidance=4.0, seed=0, on_step=on_step, batch_size=samples, prompt_encoder=reference.prompt_encoder)
    return load


def load_figure(fractions: dict[str, list[list[float]]]) -> str:
    """Heat maps (timestep bin x expert, share of assignments) of the first, middle and last routed layer."""
    names = list(fractions)
    layers = list(dict.fromkeys([names[0], names[len(names) // 2], names[-1]]))

    def draw(ax) -> None:
        shares = torch.cat([torch.tensor(fractions[n]).T for n in layers])  # [layers * experts, bins]
        image = ax.imshow(shares, aspect="auto", origin="lower", cmap="viridis", vmin=0, extent=(0, 1000, 0, len(shares)))
        ax.set_yticks([(i + 0.5) * len(shares) / len(layers) for i in range(len(layers))], layers, fontsize=6)
        ax.set_xlabel("timestep")
        ax.set_title("share of routed assignments per expert (rows) and timestep")
        ax.figure.colorbar(image, ax=ax)

    return plot_to_file(draw)


def budget(spec: str, state_path: str | None, recipe_file: str | None) -> dict:
    """Distillation budget from the recipe (a compressed folder's resolved one, else ``recipe_file``) and, from
    the trainer's state, the steps reached and training seconds."""
    out: dict = {}
    recipe = Path(recipe_file) if recipe_file else Path(spec) / "compressdit_recipe.yaml"
    if recipe.exists():
        stages = {s.name: s.config for s in load_recipe(str(recipe)).stages}
        calib = next((c.batches * c.batch_size for n, c in stages.items() if hasattr(c, "batches")), 0)
        if "distill" in stages:
            d = stages["distill"]
            out.update(steps=d.steps, batch_size=d.batch_size, calibration_samples=calib,
                       samples=d.steps * d.batch_size + calib)
    if state_path:
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        out.update(steps_reached=state["step"], train_seconds=round(state["train_seconds"], 1))
    return out


def verdicts(bars: dict) -> dict[str, bool]:
    """The issue's quality bars for the candidate: FD-FMNIST (real) within 10% of the dense model's, class
    accuracy within 2 points, and better than the baseline on both."""
    fd, acc = bars["metrics"]["FD-FMNIST vs real test images"], bars["metrics"]["class accuracy"]
    return {"FD within 10% of dense": fd["candidate"] <= 1.1 * fd["reference"],
            "class accuracy within 2 points": acc["candidate"] >= acc["reference"] - 0.02,
            "FD better than baseline": fd["candidate"] < fd["baseline"],
            "class accuracy better than baseline": acc["candidate"] > acc["baseline"]}


def summary_markdown(bars: dict) -> str:
    """One table (dense, candidate, baseline) with parameters, quality, budget and training time; bar verdicts."""
    m, params, budgets = bars["metrics"], bars["parameters"], bars.get("distillation", {})
    names = {"reference": f"dense {bars['reference']}", "candidate": bars["candidate"], "baseline": bars["baseline"]}

    def cell(key: str, column: str, fmt: str = "{:.2f}") -> str:
        value = m.get(key, {}).get(column)
        return "—" if value is None else fmt.format(value)

    rows = ["| model | total params | activated / token | FD-FMNIST vs real | class acc. | PSNR vs dense | "
            "SSIM | distillation samples (steps x batch + calib.) | training s |", "|" + "---|" * 9]
    for column in ("reference", "candidate", "baseline"):
        b = budgets.get(column, {})
        spent = (f"{b['steps_reached'] * b['batch_size'] + b['calibration_samples']:,} "
                 f"({b['steps_reached']} x {b['batch_size']} + {b['calibration_samples']})") if "steps_reached" in b \
            else (f"{b['samples']:,}" if "samples" in b else "—")
        rows.append(f"| {names[column]} | {params[column]['total']:,} | {params[column]['activated']:,} | "
                    f"{cell('FD-FMNIST vs real test images', column)} | "
                    f"{cell('class accuracy', column, '{:.1%}')} | {cell('PSNR vs reference (same seeds)', column)} | "
                    f"{cell('SSIM vs reference (same seeds)', column, '{:.3f}')} | {spent} | "
                    f"{b.get('train_seconds', '—')} |")
    lines = [f"Evaluation: {bars['samples']} samples, {bars['steps']} steps, guidance 4, seed 0; "
             f"{bars['wall_s']} s wall.", "", *rows, "", "Bars (candidate):", ""]
    lines += [f"- {name}: {'yes' if ok else 'no'}" for name, ok in verdicts(bars).items()]
    for column, r in bars.get("routing", {}).items():
        shares = ", ".join(f"{x:.2f}" for x in r["busiest_share_per_bin"])
        lines.append(f"- {column} routing while sampling: router entropy {r['router_entropy']:.3f} nats; busiest "
                     f"expert's share per tenth of the timesteps (balanced {1 / r['experts']:.3f}): {shares}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("candidate")
    parser.add_argument("baseline")
    parser.add_argument("out", type=Path)
    parser.add_argument("--reference", default="zoo:dit-fmnist")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--effnet", action="store_true", help="also FD-EffNet (off: saves CPU on a shared machine)")
    parser.add_argument("--top-k", type=int, default=3, help="top-k of a MoE student (active blocks of a MoB one) rebuilt from a state.pt")
    parser.add_argument("--states", nargs=2, default=None, metavar=("CANDIDATE_STATE", "BASELINE_STATE"),
                        help="the trainers' state.pt (steps reached, training seconds)")
    parser.add_argument("--recipes", nargs=2, default=None, metavar=("CANDIDATE_RECIPE", "BASELINE_RECIPE"),
                        help="recipes of students given as state.pt (default: each folder's resolved recipe)")
    parser.add_argument("--load-samples", type=int, default=64, help="samples whose routing the expert load counts")
    args = parser.parse_args()
    torch.set_num_threads(2)
    started = time.perf_counter()
    reference = load_source(args.reference, cache_dir=default_cache_dir())
    entries = {}
    trained = {}
    for column, spec in (("candidate", args.candidate), ("baseline", args.baseline)):
        if spec.endswith(".pt"):
            model, trained[column] = student_from_state(reference, spec, args.top_k)
            entries[column] = Entry(column, model, f"{spec} (step {trained[column]})")
        else:
            source = load_source(spec)
            entries[column] = Entry(column, source.transformer, spec, source.transformer_folder)
    tables, figures, routing = [], {}, {}
    for column, entry in entries.items():
        if not moe_layers(entry.model) and not group_routers(entry.model):
            continue
        load = sampling_load(reference, entry.model.eval(), args.load_samples, args.steps)
        summary = load.summary()
        routing[column] = {**summary, "per_layer": load.fractions()}
        table = expert_load_table(summary)
        table["title"] = f"{column}: {table['title'].replace('during distillation', 'while sampling')}"
        tables.append(table)
        figures[f"Expert load per timestep ({column})"] = load_figure(load.fractions())
    config = EvaluateConfig.from_dict({"samples": args.samples, "steps": args.steps, "guidance": 4.0, "seed": 0,
                                       "effnet": args.effnet},
                                      "evaluate")
    name = args.reference.removeprefix("zoo:")
    report = run_evaluation(entries["candidate"], reference, config, args.out, f"Dense2MoE bars on {name}",
                            cache_dir=default_cache_dir(), baseline=entries["baseline"], tables=tables,
                            figures=figures)
    models = {"reference": reference.transformer, **{k: e.model for k, e in entries.items()}}
    params = {k: {"total": sum(p.numel() for p in m.parameters()), "activated": activated_parameters(m)}
              for k, m in models.items()}
    states = dict(zip(("candidate", "baseline"), args.states or (None, None)))
    recipes = dict(zip(("candidate", "baseline"), args.recipes or (None, None)))
    budgets = {k: budget(spec, states[k], recipes[k])
               for k, spec in (("candidate", args.candidate), ("baseline", args.baseline))}
    bars = {"reference": args.reference, "metrics": {m["name"]: m["values"] for m in report["metrics"]},
            "parameters": params, "distillation": budgets, "routing": routing, "samples": args.samples,
            "steps": args.steps, "wall_s": round(time.perf_counter() - started, 1),
            "candidate": args.candidate, "baseline": args.baseline, "trained_steps": trained}
    (args.out / "bars.json").write_text(json.dumps(bars, indent=1))
    (args.out / "bars.md").write_text(summary_markdown(bars))
    print(json.dumps({k: v for k, v in bars.items() if k != "routing"}, indent=1))


if __name__ == "__main__":
    main()
