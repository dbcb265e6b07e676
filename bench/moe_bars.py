"""Dense2MoE bars on zoo:dit-fmnist: a distilled candidate (e.g. dense2moe-50) beside the dense teacher and a
baseline checkpoint (e.g. width-ffn-50 distilled with the same budget), one evaluation at identical seeds (the
report machinery: FD-FMNIST, class accuracy, PSNR to the dense samples), plus total and activated parameters.

    PYTHONPATH=$PWD nice -n 15 python bench/moe_bars.py CANDIDATE_DIR BASELINE_DIR OUT_DIR [--samples 256]

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
from compressdit.evaluate.engine import Entry
from compressdit.io.sources import load_source
from compressdit.moe.blocks import activated_parameters
from compressdit.stages.evaluate import EvaluateConfig, run_evaluation


def student_from_state(reference, path: str, top_k: int):
    """The reference's transformer reshaped to the student a trainer checkpoint holds, with its weights."""
    import copy
    import re

    from compressdit.io.structure import apply_structure, record_structure
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
    apply_structure(model, {"moe": moe, "width": width, "mob": mob})
    model.load_state_dict(weights)
    record_structure(model)
    return model.eval(), state["step"]


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
    config = EvaluateConfig.from_dict({"samples": args.samples, "steps": args.steps, "guidance": 4.0, "seed": 0,
                                       "effnet": args.effnet},
                                      "evaluate")
    report = run_evaluation(entries["candidate"], reference, config, args.out, "Dense2MoE bars on dit-fmnist",
                            cache_dir=default_cache_dir(), baseline=entries["baseline"])
    models = {"reference": reference.transformer, **{k: e.model for k, e in entries.items()}}
    params = {k: {"total": sum(p.numel() for p in m.parameters()), "activated": activated_parameters(m)}
              for k, m in models.items()}
    bars = {"metrics": {m["name"]: m["values"] for m in report["metrics"]}, "parameters": params,
            "samples": args.samples, "steps": args.steps, "wall_s": round(time.perf_counter() - started, 1),
            "candidate": args.candidate, "baseline": args.baseline, "trained_steps": trained}
    (args.out / "bars.json").write_text(json.dumps(bars, indent=1))
    print(json.dumps(bars, indent=1))


if __name__ == "__main__":
    main()
