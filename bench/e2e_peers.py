"""CPU time per guided denoising step of real-size DiT-XL/2 and PixArt-alpha (random weights): float,
compressdit recipes and peers (torchao, bitsandbytes) on the same model and inputs, eager and torch.compile'd.

Every variant of a model is built from the same seeded float weights (``peer_models.build``) and quantizes the
same layers (all but embedders and head). A step is one forward over ``2 x batch`` rows (conditional +
unconditional, classifier-free guidance); PixArt gets 120 random text tokens of width 4096. Variants (and
their ``torch.compile``'d copies, batch 1) are timed in interleaved rounds, after one batch-1 step each (the
build's check, and the compile) as warm-up; the ratio to fp32 eager is taken
within a round and its median reported. A section stops starting rounds at ``--deadline`` (UTC) and records the
rounds it had. Peak memory and graph breaks come from ``bench/peak_memory.py`` (one fresh process per variant).
Usage::

    python bench/e2e_peers.py                       # writes bench/results/e2e_peers_cpu.{json,md}
    python bench/e2e_peers.py --quick               # 2 blocks, batch 1, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from e2e_peers_report import machine, write_markdown  # noqa: E402
from emulation import EMULATIONS, emulate  # noqa: E402
from peer_models import VARIANTS, build, one_step, step_inputs  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SECTIONS = ["DiT-XL/2 256px@1", "DiT-XL/2 256px@8", "PixArt-alpha 256px@1"]
COMPILED = ["fp32", "bf16", "w8a8", "w4a16", "torchao int8 dynamic"]
GROUPS = ["bf16,rtn-w8a8,w8a8,w4a16,torchao int8 dynamic", "w4a8,vq-w3,torchao int8 weight-only,bnb int8,bnb nf4"]


def wait_until(start_at: str | None) -> None:
    """Sleep until ``start_at`` (HH:MM UTC): building and compiling may run earlier, timing starts then."""
    while start_at and past(start_at) is False:
        time.sleep(10)


def past(deadline: str | None) -> bool:
    if deadline is None:
        return False
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M")
    return now >= deadline


def cached_build(model_name: str, name: str, layers: int | None, cache: Path | None) -> tuple:
    """``peer_models.build``, or the module pickled by an earlier run in ``cache`` (re-prepacked on load)."""
    from compressdit.models import adapter_for
    from compressdit.quant.kernel_registry import prepack_model

    path = cache / f"{model_name}-{name}-{layers or 'full'}.pt".replace("/", "_").replace(" ", "_") if cache else None
    if path is not None and path.exists():
        started = time.perf_counter()
        model = torch.load(path, weights_only=False)
        prepack_model(model)
        return model, adapter_for(model), {"build_s": round(time.perf_counter() - started, 2), "from": "cache"}
    model, adapter, info = build(model_name, name, layers)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(model, path)
        except Exception:  # noqa: BLE001 - torchao's quantized tensors do not pickle: rebuilt each time
            path.unlink(missing_ok=True)
    return model, adapter, info


def build_all(model_name: str, names: list[str], args) -> tuple[dict, dict, object]:
    """name -> model, name -> one-line error (a variant that fails to build or run is reported, not dropped)."""
    models, errors, adapter = {}, {}, None
    for name in names:
        try:
            model, adapter, info = cached_build(model_name, name, args.layers, args.cache)
            one_step(adapter, model, step_inputs(adapter, model, 1, VARIANTS[name].dtype))
            models[name] = model
            print(f"{model_name} {name}: {info}", flush=True)
        except Exception as error:  # noqa: BLE001 - a peer that fails on CPU is a result
            errors[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            print(f"{model_name} {name}: FAILED {errors[name]}", flush=True)
    return models, errors, adapter


def compile_all(adapter, models: dict, names: list[str]) -> tuple[dict, dict]:
    compiled, info = {}, {}
    for name in names:
        if name not in models:
            continue
        started = time.perf_counter()
        try:
            model = torch.compile(models[name])
            one_step(adapter, model, step_inputs(adapter, models[name], 1, VARIANTS[name].dtype))
            compiled[name] = model
            info[name] = {"compile_s": round(time.perf_counter() - started, 1)}
        except Exception as error:  # noqa: BLE001
            info[name] = {"compile_error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        print(f"compile {name}: {info[name]}", flush=True)
    return compiled, info


def time_section(adapter, runs: dict, batch: int, rounds: int, deadline: str | None) -> tuple[dict, int]:
    """runs: column -> (model, dtype); returns column -> seconds per round, and the rounds done."""
    inputs = {dtype: step_inputs(adapter, next(m for m, d in runs.values() if d == dtype), batch, dtype)
              for dtype in {d for _, d in runs.values()}}
    times: dict[str, list[float]] = {column: [] for column in runs}
    done = 0
    for _ in range(rounds):
        if past(deadline):
            break
        for column, (model, dtype) in runs.items():
            started = time.perf_counter()
            one_step(adapter, model, inputs[dtype])
            times[column].append(time.perf_counter() - started)
            print(f"batch {batch} {column}: {times[column][-1]:.3f} s", flush=True)
        done += 1
    return times, done


def summarise(times: dict, done: int) -> dict:
    out = {}
    for column, values in times.items():
        if not values:
            continue
        ratios = [f / t for f, t in zip(times["fp32"], values)]
        out[column] = {"s_per_step": round(statistics.median(values), 3), "speedup_vs_fp32": round(
            statistics.median(ratios), 3), "s_all": [round(v, 3) for v in values]}
    return out


def section_rows(model_name: str, names: list[str], models: dict, errors: dict, summary: dict, info: dict) -> dict:
    from compressdit.quant.kernel_registry import kernel_summary

    rows = {}
    for name in names:
        row = {"variant": name, "note": VARIANTS[name].note}
        if name in errors:
            row["error"] = errors[name]
        elif name in summary:
            row.update(summary[name])
            peer = VARIANTS[name].plan_recipe is not None and not VARIANTS[name].note.startswith("compressdit")
            row["kernels"] = kernel_summary(models[name]) or (VARIANTS[name].note if peer else "float")
            if f"{name} compiled" in summary:
                compiled = summary[f"{name} compiled"]
                row["compiled"] = {"s_per_step": compiled["s_per_step"],
                                   "speedup_vs_fp32": compiled["speedup_vs_fp32"], **info[name]}
            elif name in info:
                row["compiled"] = info[name]
        else:
            continue
        rows[name] = row
    return rows


def run_model(model_name: str, batches: list[tuple[int, str]], args, save) -> list[dict]:
    """Every variant group of one model at every batch: fp32 (eager, and compiled in the first group) is timed
    in every group's rounds, the group's variants are freed before the next group is built (memory)."""
    sections = {batch: {"model": model_name, "batch": batch, "cfg_rows": 2 * batch, "rounds": {}, "rows": {}}
                for batch, _ in batches}
    fp32, errors, adapter = build_all(model_name, ["fp32"], args)
    for index, group in enumerate(args.groups):
        names = [n for n in group.split(",") if n in args.variants and n != "fp32"]
        models, group_errors, _ = build_all(model_name, names, args)
        models, errors = {**fp32, **models}, {**errors, **group_errors}
        compile_names = [n for n in args.compile if n in models and (n != "fp32" or index == 0)]
        compiled, info = compile_all(adapter, models, compile_names)
        for batch, deadline in batches if not args.build_only else []:
            if past(deadline):
                continue
            runs = {name: (model, VARIANTS[name].dtype) for name, model in models.items()}
            if batch in args.compile_batches:
                runs.update({f"{n} compiled": (m, VARIANTS[n].dtype) for n, m in compiled.items()})
            wait_until(args.start_at)
            rounds = dict(item.split(":") for item in args.batch_rounds).get(str(batch), args.rounds)
            times, done = time_section(adapter, runs, batch, int(rounds), deadline)
            if not done:
                continue
            shown = (["fp32"] if index == 0 else []) + names
            section = sections[batch]
            section["rounds"][f"group {index + 1}"] = done
            section["rows"].update(section_rows(model_name, shown, models, errors, summarise(times, done), info))
            section.setdefault("fp32_s_by_group", {})[f"group {index + 1}"] = summarise(times, done)["fp32"]["s_all"]
            save([s for s in sections.values() if s["rounds"]])
        runs = times = None  # drop every reference to this group's models before the next group is built
        del models, compiled
        torch._dynamo.reset()
        gc.collect()
    return [s for s in sections.values() if s["rounds"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=None,
                        help="MODEL@BATCH[@HH:MM], run in this order; HH:MM (UTC) ends that section's rounds")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--groups", nargs="+", default=GROUPS,
                        help="comma-separated variant groups built and timed one after the other (with fp32)")
    parser.add_argument("--compile", nargs="*", default=COMPILED, help="variants also timed torch.compile'd")
    parser.add_argument("--compile-batches", type=int, nargs="*", default=[1])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None, help="blocks per model (default: the real depth)")
    parser.add_argument("--deadline", default=None, help="HH:MM UTC after which no new round starts")
    parser.add_argument("--start-at", default=None, help="HH:MM UTC: build and compile, then wait to time")
    parser.add_argument("--cache", type=Path, default=None, help="folder of pickled built variants (reused)")
    parser.add_argument("--build-only", action="store_true",
                        help="build (into --cache) and compile (warming inductor's cache), time nothing")
    parser.add_argument("--batch-rounds", nargs="*", default=[], help="BATCH:ROUNDS caps, e.g. 8:1")
    parser.add_argument("--quick", action="store_true", help="2 blocks, DiT-XL/2 batch 1, 1 round")
    parser.add_argument("--out", type=Path, default=RESULTS / "e2e_peers_cpu")
    parser.add_argument("--emulate", choices=sorted(EMULATIONS), default=None,
                        help="run as on a lesser CPU (bench/emulation.py): its code paths on this CPU")
    args = parser.parse_args()
    emulate(args.emulate)
    if args.quick:
        args.layers, args.rounds, args.sections = 2, 1, args.sections or ["DiT-XL/2 256px@1"]
        args.out = args.out.with_name(args.out.name + "_quick")
    args.sections = args.sections or SECTIONS
    torch.set_num_threads(args.threads)
    result = {"meta": {**machine(args.threads), "emulate": args.emulate,
                       "capability": torch.backends.cpu.get_cpu_capability(), "rounds_asked": args.rounds, "groups": args.groups, "layers": args.layers or "real depth",
                       "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")},
              "sections": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    order = list(dict.fromkeys(section.split("@")[0] for section in args.sections))
    done_sections: list[dict] = []

    def save(current: list[dict]) -> None:
        result["sections"] = done_sections + current
        result["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(args.out)
        print(f"wrote {args.out.with_suffix('.json')} and .md", flush=True)

    for model_name in order:
        batches = []
        for section in args.sections:
            name, batch, *own = section.split("@")
            if name == model_name:
                batches.append((int(batch), min([args.deadline or "99:99"] + own)))
        if past(args.deadline):
            result["meta"].setdefault("not_run", []).append(model_name)
            continue
        done_sections += run_model(model_name, batches, args, save)
    if args.build_only:
        return
    asked = {(s.split("@")[0], int(s.split("@")[1])) for s in args.sections}
    timed = {(s["model"], s["batch"]) for s in done_sections}
    result["meta"]["not_run"] = [f"{m} batch {b}" for m, b in sorted(asked - timed)]
    save([])


if __name__ == "__main__":
    main()
