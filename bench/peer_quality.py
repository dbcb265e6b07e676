"""Quality side by side: compressdit's W8A8 / FP8 / W4 recipes against NVIDIA ModelOpt, torchao and bitsandbytes on
the trained reference models, 500 samples, 20 steps, CFG 4, seed 0, the same seeds for every row.

    PYTHONPATH=$PWD nohup nice -n 15 python bench/peer_quality.py > /tmp/peer_quality.log 2>&1 &

Rows, per model: full precision; our shipped ``rtn-w8a8``, ``w8a8``, ``fp8``, ``rtn-w8a16``, ``w4a16``, ``w4a8`` (each calibrated and
quantized by its own stages on one thread, saved with stock ``save_pretrained`` and reloaded with stock
``from_pretrained``, as in ``bench/lowbit_bars.py``, whose machinery this reuses); the peers of
:mod:`compressdit.evaluate.peers` on exactly the layers our recipes quantize (all linears but the embedders and the
head): ModelOpt's ``INT8_SMOOTHQUANT_CFG``, ``FP8_DEFAULT_CFG``, ``INT4_AWQ_CFG``, ``W4A8_AWQ_BETA_CFG`` as shipped
(calibrated on the same set as our recipes: 32 conditions x 10 steps, CFG 4), torchao's int8 dynamic / weight-only
and bitsandbytes' LLM.int8 / NF4 (data-free). ModelOpt runs as its own simulation off GPU (fake quantization): its
numbers are its recipes' quality, not a deployment. Metrics are the report's: FD-FMNIST (classifier features) to
real test images and to the full-precision samples, class accuracy, PSNR / SSIM to the full-precision samples.

Resumable: each model x row is appended to WORKDIR/rows.jsonl as it finishes and skipped on the next run. Writes
bench/results/peer_quality.{json,md} after every row.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowbit_bars import FULL, Bench, _fmt, load_rows, machine_line, record_row  # noqa: E402

from compressdit.evaluate.peers import PEERS, apply_peer  # noqa: E402
from compressdit.models import adapter_for  # noqa: E402
from compressdit.pipeline import peer_calibration  # noqa: E402
from compressdit.quant.transform import resolve_plan  # noqa: E402
from compressdit.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("dit-fmnist", "pixart-fmnist", "flux-fmnist")
# (ours, the peers doing the same job); the table keeps this order
GROUPS = (("W8A8", ("rtn-w8a8", "w8a8"), ("modelopt-int8-sq", "torchao-int8-dynamic", "bnb-int8")),
          ("FP8", ("fp8",), ("modelopt-fp8",)),
          ("W8 weight-only", ("rtn-w8a16",), ("torchao-int8-weight",)),
          ("W4 weight-only", ("w4a16",), ("modelopt-int4-awq", "bnb-nf4")),
          ("W4A8", ("w4a8",), ("modelopt-w4a8-awq",)))
ROWS = (FULL,) + tuple(name for _, ours, peers in GROUPS for name in ours + peers)
LAYERS_OF = "w8a8"  # the recipe whose quantized layers the peers take (every shipped recipe here takes the same)


class PeerBench(Bench):
    def peer(self, model: str, name: str) -> tuple[torch.nn.Module, dict]:
        source = self.source(model)
        transformer = copy.deepcopy(source.transformer)
        recipe = load_recipe(LAYERS_OF)
        rules = next(s for s in recipe.stages if s.name == "quantize").config.options.rules
        layers = [n for n, spec in resolve_plan(transformer, adapter_for(transformer), rules).items() if spec is not None]
        calibration = next((s.config for s in recipe.stages if s.name == "calibrate"), None)
        calibrate = peer_calibration(source, calibration) if PEERS.get(name).calibrates else None
        torch.set_num_threads(1)
        started, cpu = time.perf_counter(), time.process_time()
        apply_peer(transformer, layers, name, calibrate)
        total = round(time.perf_counter() - started, 2)
        return transformer, {"calibrate_s": 0.0, "quantize_s": total, "total_s": total,
                             "cpu_s": round(time.process_time() - cpu, 2), "layers": len(layers)}

    def run_row(self, model: str, name: str) -> dict:
        if name not in PEERS:
            return super().run_row(model, name)
        record = {"model": model, "recipe": name, "kind": "peer", "description": PEERS.get(name).description,
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            transformer, timing = self.peer(model, name)
            images, seconds = self.images(model, transformer)
            record.update(status="ok", metrics=self.metrics(model, images), time=timing,
                          sampling_s_informational=round(seconds, 1))
        except Exception as exc:  # a failed row is recorded and the table goes on
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return record


def render(rows: dict, models: list[str], meta: dict) -> str:
    lines = [f"# Quality side by side with the peers ({meta['samples']} samples, {meta['steps']} steps, CFG "
             f"{meta['guidance']}, seed {meta['seed']})", "", f"- machine: {meta['machine']}",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}",
             "- cells: FD-FMNIST to real test images / to the full-precision samples (same seeds), class accuracy, "
             "PSNR dB to the full-precision samples; bold: the best FD-to-reference of its group on that model. "
             "Ours are stored checkpoints reloaded by stock diffusers; ModelOpt rows are its own fake-quantized "
             "simulation (its deployment kernels are GPU ones), torchao / bitsandbytes their CPU modules.", "",
             "| group | variant | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    best = {}
    for label, ours, peers in GROUPS:
        for model in models:
            scores = [rows[(model, n)]["metrics"]["fd_ref"] for n in ours + peers
                      if rows.get((model, n), {}).get("status") == "ok"]
            best[(label, model)] = min(scores) if scores else None

    def cell(model: str, name: str, label: str | None) -> str:
        row = rows.get((model, name))
        if row is None:
            return "not run"
        if row["status"] != "ok":
            return f"failed: {row['error'][:80]}"
        m = row["metrics"]
        ref = _fmt(m["fd_ref"])
        if label is not None and m["fd_ref"] is not None and m["fd_ref"] == best[(label, model)]:
            ref = f"**{ref}**"
        return f"{_fmt(m['fd_real'])} / {ref}, {_fmt(m['acc'], 1, 100, '%')}, {_fmt(m['psnr'])}"

    lines.append("| - | full precision | " + " | ".join(cell(m, FULL, None) for m in models) + " |")
    for label, ours, peers in GROUPS:
        for name in ours + peers:
            who = "ours" if name in ours else "peer"
            lines.append(f"| {label} | {name} ({who}) | " + " | ".join(cell(m, name, label) for m in models) + " |")
    lines += ["", "Peers:", ""] + [f"- `{name}`: {PEERS.get(name).description}" for name in ROWS if name in PEERS]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS))
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-threads", type=int, default=1)
    parser.add_argument("--workdir", default=str(ROOT / "out" / "peer_quality"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "peer_quality"))
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    bench = PeerBench(args)
    rows_path = Path(args.workdir) / "rows.jsonl"
    rows = load_rows(rows_path)
    meta = {"machine": machine_line(), "command": " ".join(["python", *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "samples": args.samples,
            "steps": args.steps, "guidance": args.guidance, "seed": args.seed}

    def write():
        models = [m for m in MODELS if any(k[0] == m for k in rows)]
        Path(args.results + ".json").write_text(json.dumps({**meta, "rows": list(rows.values())}, indent=1))
        Path(args.results + ".md").write_text(render(rows, models, meta))

    for model in [] if args.render_only else args.models:
        for name in args.rows:
            if rows.get((model, name), {}).get("status") == "ok":
                continue
            record_row(bench, model, name, (model, name), rows, rows_path, meta, write)
    write()


if __name__ == "__main__":
    main()
