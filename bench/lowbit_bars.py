"""Issue-14 bar check: every low-bit recipe on zoo:dit-fmnist, zoo:flux-fmnist and zoo:pixart-fmnist beside full
precision and its matching round-to-nearest recipe, 500 samples, 20 steps, CFG 4, seed 0 (the recipes' evaluate
settings), the same seeds for every row.

    PYTHONPATH=$PWD nohup nice -n 15 python bench/lowbit_bars.py > /tmp/lowbit_bars.log 2>&1 &

Resumable: each model x recipe row is appended to WORKDIR/rows.jsonl as it finishes and skipped on the next run;
several processes may share WORKDIR (e.g. one per model): a row being run is claimed in WORKDIR/claims (after a
killed run, delete that folder).
Each model's full-precision samples are sampled once and cached in WORKDIR (real-data features come from the
evaluation's own cache); a row quantizes a copy of the reference with the recipe's calibrate + quantize stages on
ONE thread (calibration statistics recomputed, not read from the cache: the time is the whole cost), saves the
checkpoint with stock ``save_pretrained`` (WORKDIR/ckpt/MODEL/RECIPE), reloads it with stock ``from_pretrained``
and samples the reloaded model. Metrics are the report's (compressdit.evaluate): FD-FMNIST to real test images and
to the full-precision samples, class accuracy, PSNR / SSIM to the full-precision samples. Storage: the whole
transformer's bytes in memory and on disk per parameter, and the quantized layers' bits per weight with every stored
tensor of the layer counted (codes, scales, low-rank branch, rotation codes; bias left out).

``rtn-w4a6`` is built here (not shipped): ``rtn-w4a8`` with 6-bit integer activations per token, the integer recipe
at fp4-w4a6's bits and granularity (int4 weights in groups of 64, dynamic per-token activations).
Extra rows (e.g. a recipe setting tried as a fix): ``--extra MODEL=path/to/recipe.yaml`` (row name: the recipe's).
Writes bench/results/lowbit_bars.{json,md} after every row (machine line, command, date, table, verdicts).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lowbit_verdicts import FULL, storage_bits, verdicts  # noqa: E402

from compressdit.cache import default_cache_dir  # noqa: E402
from compressdit.evaluate.engine import Feature, EvalSettings, evaluation_conditions, logical_parameters  # noqa: E402
from compressdit.evaluate.features import ClassifierFeatures  # noqa: E402
from compressdit.evaluate.metrics import class_accuracy, frechet_distance, psnr, ssim  # noqa: E402
from compressdit.io.checkpoint import folder_bytes, stored_float_dtype  # noqa: E402
from compressdit.io.save import save_in_dtype  # noqa: E402
from compressdit.io.diffusers_quantizer import attach_quantizer  # noqa: E402
from compressdit.io.sources import load_source, load_transformer  # noqa: E402
from compressdit.models import adapter_for  # noqa: E402
from compressdit.models.sampling import decode_latents, sample  # noqa: E402
from compressdit.pipeline import apply_stages  # noqa: E402
from compressdit.quant.transform import quantized_modules  # noqa: E402
from compressdit.recipe import Recipe, load_recipe  # noqa: E402
from compressdit.stages import PipelineState  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("dit-fmnist", "flux-fmnist", "pixart-fmnist")
FIRST = (FULL, "rtn-w4a8", "gptq-w4a8", "rtn-w4a16", "gptq-w4a16", "rtn-w4a4", "svdquant-w4a4", "lrq-w4a4")
SECOND = ("fp4-w4a8", "rtn-w4a6", "fp4-w4a6", "nvfp4", "mxfp4", "svdquant-nvfp4", "lrq-w3a4", "w4a8", "w4a16")


def build_recipe(name: str) -> Recipe:
    if name.endswith((".yaml", ".yml")):
        return load_recipe(name)
    if name != "rtn-w4a6":
        return load_recipe(name)
    data = load_recipe("rtn-w4a8").to_dict()
    data["name"] = "rtn-w4a6"
    data["description"] = "rtn-w4a8 with int6 activations per token: the integer recipe at fp4-w4a6's bits"
    for rule in data["stages"][0]["quantize"]["rules"]:
        if rule["spec"] is not None:
            rule["spec"]["a_bits"] = 6
    return Recipe.from_dict(data, source="rtn-w4a6 (bench/lowbit_bars.py)")


class Bench:
    def __init__(self, args) -> None:
        self.args = args
        self.work = Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.settings = EvalSettings(samples=args.samples, steps=args.steps, guidance=args.guidance, seed=args.seed,
                                     effnet=False)
        self.features = Feature(self.settings, default_cache_dir())
        self.sources: dict = {}
        self.references: dict = {}

    def source(self, model: str):
        if model not in self.sources:
            self.sources[model] = load_source(f"zoo:{model}", name=f"zoo:{model}", cache_dir=default_cache_dir())
        return self.sources[model]

    def images(self, model: str, transformer) -> tuple[torch.Tensor, float]:
        source = self.source(model)
        adapter = adapter_for(source.transformer)
        conditions, _ = evaluation_conditions(adapter, self.settings.samples)
        torch.set_num_threads(self.args.sample_threads)
        started = time.perf_counter()
        with torch.no_grad():
            latents = sample(adapter, transformer, conditions, source.scheduler or adapter.scheduler(transformer),
                             steps=self.settings.steps, guidance=self.settings.guidance, seed=self.settings.seed,
                             prompt_encoder=source.prompt_encoder)
            images = decode_latents(source.vae, latents)
        return images, time.perf_counter() - started

    def reference(self, model: str) -> torch.Tensor:
        if model not in self.references:
            s = self.settings
            path = self.work / "reference" / f"{model}-n{s.samples}-s{s.steps}-g{s.guidance}-seed{s.seed}.pt"
            if path.exists():
                self.references[model] = torch.load(path, weights_only=True)
            else:
                images, _ = self.images(model, self.source(model).transformer)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(images, path)
                self.references[model] = images
        return self.references[model]

    def metrics(self, model: str, images: torch.Tensor) -> dict:
        adapter = adapter_for(self.source(model).transformer)
        _, labels = evaluation_conditions(adapter, self.settings.samples)
        classifier = self.features.classifier()
        extractor = ClassifierFeatures(classifier)
        real = self.features.real("FD-FMNIST", extractor)
        reference = self.reference(model)
        with torch.no_grad():
            feats, ref_feats = extractor(images), extractor(reference)
            logits = classifier(images)
        same = images is reference
        return {"fd_real": round(frechet_distance(feats, real), 4),
                "fd_ref": None if same else round(frechet_distance(feats, ref_feats), 4),
                "acc": round(class_accuracy(logits, labels), 4),
                "psnr": None if same else round(psnr(images, reference), 3),
                "ssim": None if same else round(ssim(images, reference), 4)}

    def quantize(self, model: str, recipe: Recipe, folder: Path) -> tuple[torch.nn.Module, dict]:
        """Calibrate + quantize a copy of the reference on one thread, save, and reload with stock diffusers."""
        source = self.source(model)
        transformer = copy.deepcopy(source.transformer)
        state = PipelineState(source=source, adapter=adapter_for(transformer), model=transformer,
                              workdir=folder, reference_spec=source.name, quiet=True, cache_dir=None,
                              recipe_name=recipe.name)
        torch.set_num_threads(1)
        started, cpu = time.perf_counter(), time.process_time()
        apply_stages(recipe, state)
        total = time.perf_counter() - started
        timing = {"calibrate_s": state.timings.get("calibrate_s", 0.0), "quantize_s": state.timings.get("quantize_s"),
                  "total_s": round(total, 2), "cpu_s": round(time.process_time() - cpu, 2)}
        attach_quantizer(transformer, state.quant_specs)
        save_in_dtype(transformer, folder, stored_float_dtype(source.transformer_folder))
        return load_transformer(folder), timing

    def storage(self, transformer, folder: Path) -> dict:
        params = logical_parameters(transformer)
        memory = int(transformer.get_memory_footprint())
        disk = folder_bytes(folder)
        layers = {n: m.in_features * m.out_features for n, m in quantized_modules(transformer).items()}
        on_disk = {}
        for path in folder.rglob("*.safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    count = 1
                    for d in piece.get_shape():
                        count *= d
                    on_disk[key] = count * _dtype_bytes(piece.get_dtype())
        in_memory = {}
        for name, module in quantized_modules(transformer).items():
            tensors = dict(module.named_parameters(recurse=True))
            tensors.update(dict(module.named_buffers(recurse=True)))
            for key, t in tensors.items():
                if t is not None:
                    in_memory[f"{name}.{key}"] = t.untyped_storage().nbytes()
        return {"parameters": params, "memory_bytes": memory, "disk_bytes": disk,
                "memory_bytes_per_param": round(memory / params, 4), "disk_bytes_per_param": round(disk / params, 4),
                "quantized": {**storage_bits(on_disk, layers),
                              "memory_bits_per_weight": storage_bits(in_memory, layers)["bits_per_weight"]}}

    def run_row(self, model: str, name: str) -> dict:
        record = {"model": model, "recipe": name, "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        try:
            if name == FULL:
                source = self.source(model)
                images = self.reference(model)
                transformer, folder, timing = source.transformer, source.transformer_folder, None
            else:
                recipe = build_recipe(name)
                folder = self.work / "ckpt" / model / recipe.name
                if folder.exists():
                    for p in sorted(folder.rglob("*"), reverse=True):
                        p.unlink() if p.is_file() else p.rmdir()
                transformer, timing = self.quantize(model, recipe, folder)
                images, seconds = self.images(model, transformer)
                record["sampling_s_informational"] = round(seconds, 1)
                record["recipe_stages"] = recipe.to_dict()["stages"][:-1] if recipe.stage("evaluate") else \
                    recipe.to_dict()["stages"]
                torch.save(images, self.work / "ckpt" / model / f"{recipe.name}-images.pt")
            record.update(status="ok", metrics=self.metrics(model, images), time=timing,
                          storage=self.storage(transformer, Path(folder)))
        except Exception as exc:  # a failed row is recorded and the table goes on
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc()[-2000:])
        record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        return record


def _dtype_bytes(name: str) -> int:
    sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
    return sizes[name]


def load_rows(path: Path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["model"], row["recipe"])] = row
    return rows


def machine_line() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs (shared; load "
            f"{load[0]:.1f} at start), torch {torch.__version__}, python {platform.python_version()}")


def _fmt(value, digits=2, scale=1.0, suffix=""):
    return "-" if value is None else f"{value * scale:.{digits}f}{suffix}"


def render(rows: dict, models: list[str], meta: dict) -> tuple[dict, str]:
    verdict = verdicts(rows, models)
    order = list(FIRST + SECOND)
    names = order + sorted({r for _, r in rows if r not in order})
    lines = [f"# Issue-14 low-bit bars ({meta['samples']} samples, {meta['steps']} steps, CFG {meta['guidance']}, "
             f"seed {meta['seed']})", "", f"- machine: {meta['machine']}", f"- command: `{meta['command']}`",
             "- reproduce: `PYTHONPATH=$PWD nice -n 15 python bench/lowbit_bars.py --sample-threads 1` (rows resume; "
             "more processes may share the workdir, e.g. `--models flux-fmnist pixart-fmnist`, then "
             "`--render-only`)",
             f"- date: {meta['date']}",
             "- FD = FD-FMNIST (classifier features); `real`: to 2000 real test images, `ref`: to the full-precision "
             "model's samples (same seeds); PSNR / SSIM to those samples; bits/w: quantized layers, every stored "
             "tensor counted (scales, low-rank branch, rotation codes; bias out); B/param: whole transformer "
             "(memory / disk); time: calibrate + quantize wall seconds on one thread (calibration recomputed) on a "
             "shared 2-core machine at nice 15 (an upper bound), and the process CPU seconds of it.", ""]
    for model in models:
        lines += [f"## {model}", "",
                  "| recipe | FD real | FD ref | class acc. | PSNR dB | SSIM | bits/w disk (mem) | B/param mem / disk "
                  "| calib + quant wall s (CPU s) |", "|---|---|---|---|---|---|---|---|---|"]
        for name in names:
            row = rows.get((model, name))
            if row is None:
                continue
            if row["status"] != "ok":
                lines.append(f"| {name} | failed: {row['error'][:120]} |||||||||")
                continue
            m, s, t = row["metrics"], row["storage"], row.get("time")
            q = s["quantized"]
            bits = "-" if not q["layers"] else f"{q['bits_per_weight']:.3f} ({q['memory_bits_per_weight']:.3f})"
            times = "-" if t is None else f"{t['calibrate_s']:.1f} + {t['quantize_s']:.1f} = {t['total_s']:.1f}" + \
                (f" ({t['cpu_s']:.1f} CPU)" if "cpu_s" in t else "")
            lines.append(f"| {name} | {_fmt(m['fd_real'])} | {_fmt(m['fd_ref'])} | {_fmt(m['acc'], 1, 100, '%')} | "
                         f"{_fmt(m['psnr'])} | {_fmt(m['ssim'], 3)} | {bits} | {s['memory_bytes_per_param']:.3f} / "
                         f"{s['disk_bytes_per_param']:.3f} | {times} |")
        lines.append("")
    lines += ["## Verdicts", ""]

    def verdict_line(v):
        state = {True: "PASS", False: "FAIL", None: "incomplete"}[v["pass"]]
        parts = [f"{m}: {d}" for m, d in v["models"].items()]
        return f"- **{state}** {v['bar']} — " + "; ".join(parts)

    for group in ("w4", "w4a4", "fp4"):
        lines += [verdict_line(v) for v in verdict[group]]
    lines.append(verdict_line(verdict["lrq_w3a4"]) + " (reported; no bar)")
    lines.append(f"- W4A4 head to head (FD ref): {json.dumps(verdict['w4a4_head_to_head'])}")
    lines.append(f"- time: {json.dumps(verdict['time'])}")
    data = {**meta, "rows": list(rows.values()), "verdicts": verdict}
    return data, "\n".join(lines) + "\n"


def record_row(bench: Bench, model: str, name: str, key: tuple[str, str], rows: dict, rows_path: Path, meta: dict,
               write) -> None:
    """Run one row (``bench.run_row``), append it to the rows file (what a resumed run reads back), log it and
    ``write()`` the tables with the date of this row."""
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {model} / {name} ...", flush=True)
    record = bench.run_row(model, name)
    record["recipe"] = key[1]
    rows[key] = record
    with rows_path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {model} / {key[1]}: {record['status']} "
          f"{record.get('metrics', record.get('error'))} time {record.get('time')}", flush=True)
    meta["date"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--recipes", nargs="+", default=None, help="rows to run (default: the two tiers)")
    parser.add_argument("--extra", nargs="*", default=[], help="MODEL=recipe.yaml rows, run after the tiers")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-threads", type=int, default=2)
    parser.add_argument("--workdir", default=str(ROOT / "out" / "lowbit_bars"))
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "lowbit_bars"))
    parser.add_argument("--retry-errors", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    bench = Bench(args)
    rows_path = Path(args.workdir) / "rows.jsonl"
    rows = load_rows(rows_path)
    tiers = [args.recipes] if args.recipes else [FIRST, SECOND]
    plan = [(m, r) for tier in tiers for m in args.models for r in tier]
    plan += [tuple(e.split("=", 1)) for e in args.extra]
    meta = {"machine": machine_line(), "command": " ".join(["python", *sys.argv]),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "samples": args.samples,
            "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "models": args.models}

    def write():  # every model with rows (processes sharing the workdir may each run some of the models)
        rows.update(load_rows(rows_path))
        models = [m for m in MODELS if any(k[0] == m for k in rows)] + \
            sorted({k[0] for k in rows if k[0] not in MODELS})
        data, text = render(rows, models, {**meta, "models": models})
        Path(args.results + ".json").write_text(json.dumps(data, indent=1))
        Path(args.results + ".md").write_text(text)

    claims = Path(args.workdir) / "claims"
    claims.mkdir(exist_ok=True)
    for model, name in ([] if args.render_only else plan):
        key = (model, build_recipe(name).name if name.endswith((".yaml", ".yml")) else name)
        rows.update(load_rows(rows_path))  # rows other processes finished (several may share a workdir)
        done = rows.get(key)
        if done is not None and (done["status"] == "ok" or not args.retry_errors):
            continue
        claim = claims / f"{key[0]}__{key[1]}"
        try:  # another process sharing the workdir runs this row
            claim.open("x").close()
        except FileExistsError:
            continue
        record_row(bench, model, name, key, rows, rows_path, meta, write)
        claim.unlink()
    write()


if __name__ == "__main__":
    main()
