"""The ``compressdit`` command line (Typer + rich)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

try:  # the click typer runs on: its own copy from typer 0.29 on, else click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - typer < 0.29
    from click import exceptions as click_errors

from compressdit.errors import CompressditError, ConfigError
from compressdit.progress import set_quiet

# each command imports its machinery (pipeline, recipes, stages, gguf, zoo training) in its body, so that
# `compressdit --help` and the light commands do not load it

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training compression for Diffusion Transformers; checkpoints load back into diffusers.")
zoo_app = typer.Typer(no_args_is_help=True, help="Reference models trained by compressdit on Fashion-MNIST.")
app.add_typer(zoo_app, name="zoo")
console = Console()
err_console = Console(stderr=True)

QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
JSON = typer.Option(False, "--json", help="Machine-readable output on stdout.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output folder.")


def _cell(value) -> str:
    """A report value for the terminal table: numbers to 6 significant digits, text (e.g. kernels) as it is."""
    if value is None:
        return "—"
    return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


def _summary(state, as_json: bool) -> None:
    report = state.report or {}
    payload = {"out": str(state.workdir), "recipe": state.recipe_name, "quantized_modules": len(state.quant_specs),
               "kept_blocks": state.block_origin, "timings": state.timings,
               "metrics": {m["name"]: m["values"] for m in report.get("metrics", [])}, "notes": state.notes}
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    kept = "".join(f", {stack}: {len(blocks)} kept" for stack, blocks in (state.block_origin or {}).items())
    console.print(f"[bold green]wrote[/] {state.workdir} ({len(state.quant_specs)} quantized modules{kept})")
    if report:
        table = Table(title="quality report (same seeds)")
        columns = report["columns"]
        table.add_column("metric")
        for column in columns:
            table.add_column(column, justify="right")
        for m in report["metrics"]:
            table.add_row(m["name"], *[_cell(m["values"].get(c))
                                       for c in columns])
        console.print(table)
        console.print(f"report: {state.workdir / 'report' / 'report.html'}")


def _bytes(value: Optional[str], option: str) -> Optional[int]:
    """A size such as ``20GB`` or ``512MiB`` in bytes (accelerate's parser), or None."""
    if value is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    try:
        return convert_file_size_to_int(value)
    except ValueError:
        raise ConfigError(f"{option} {value}: not a size like 20GB or 512MiB") from None


def _run(recipe, model: str, out: Path, overwrite: bool, quiet: bool, as_json: bool, calib: Optional[str],
         text_encoder: Optional[str] = None, embeddings: Optional[Path] = None, stream: bool = False,
         max_memory: Optional[str] = None, device: str = "cpu", max_cache: Optional[str] = None) -> None:
    from compressdit.pipeline import run_recipe

    set_quiet(quiet or as_json)
    state = run_recipe(recipe, model, out, overwrite=overwrite, quiet=quiet or as_json, calib=calib,
                       text_encoder=text_encoder, embeddings=None if embeddings is None else str(embeddings),
                       stream=stream, max_memory=_bytes(max_memory, "--max-memory"), device=device,
                       max_cache=_bytes(max_cache, "--max-cache"))
    from accelerate import PartialState

    if PartialState().is_main_process:  # under accelerate launch, rank 0 wrote the output and reports it
        _summary(state, as_json)


MODEL = typer.Argument(..., help="Diffusers model/pipeline folder, zoo:NAME or hub id.")
RECIPE = typer.Option(..., "--recipe", "-r", help="Recipe name (recipes/NAME.yaml) or YAML path.")
OUT = typer.Option(..., "--out", "-o", help="Output folder (written atomically).")
NO_EVAL = typer.Option(False, "--no-eval", help="Skip the recipe's evaluate stage.")
SAMPLES = typer.Option(None, "--samples", help="Override the evaluate stage's samples.")
CALIB = typer.Option(None, "--calib", help="Calibration set: a shipped name, or a .jsonl/.parquet/.csv file or folder "
                                           "with a 'prompt' (text models) or 'class_id' (class models) column.")
TEXT_ENCODER = typer.Option(None, "--text-encoder", help="Pipeline folder whose text encoders embed the prompts "
                                                         "(default: MODEL's own, when it is a pipeline).")
EMBEDDINGS = typer.Option(None, "--embeddings", help="Safetensors file of precomputed prompt embeddings "
                                                     "(keyed by prompt; include the empty prompt).")

STREAM = typer.Option(False, "--stream", help="Quantize block by block from the model's shards, one block in memory "
                                               "(calibration runs with blocks read as they are called; implied "
                                               "when the model exceeds --max-memory).")
MAX_MEMORY = typer.Option(None, "--max-memory", help="Memory budget, e.g. 20GB: a model larger than this once loaded "
                                                     "(float32) is streamed (default: the memory available).")
MAX_CACHE = typer.Option(None, "--max-cache", help="Disk a streamed GPTQ run may fill with block inputs, e.g. 50GB "
                                                   "(default: the free space less the output).")
DEVICE = typer.Option("cpu", "--device", help="Where a streamed run calibrates and quantizes (cpu, cuda, cuda:1): one "
                                              "block's weights and activations on it at a time.")

DATA = typer.Option(None, "--data", help="Training latents of every stage that trains: auto (default: Fashion-MNIST "
                                         "for zoo models, else the teacher's own samples), teacher, fmnist or "
                                         "images:PATH (image folder or .parquet/.jsonl/.csv with image + caption).")


def _run_named_recipe(recipe: str, model: str, out: Path, no_eval: bool, samples: Optional[int], overwrite: bool,
                      quiet: bool, as_json: bool, calib: Optional[str] = None, text_encoder: Optional[str] = None,
                      embeddings: Optional[Path] = None, data: Optional[str] = None, stream: bool = False,
                      max_memory: Optional[str] = None, device: str = "cpu", max_cache: Optional[str] = None) -> None:
    """Load a recipe, apply ``--no-eval`` / ``--samples`` / ``--data`` and run it (``quantize`` and ``prune``)."""
    from compressdit.distill.sources import set_data
    from compressdit.recipe import load_recipe

    loaded = load_recipe(recipe)
    if data is not None:
        set_data([stage.config for stage in loaded.stages], data)
    if no_eval:
        loaded.stages = [s for s in loaded.stages if s.name != "evaluate"]
        if not loaded.stages:  # it would write an unchanged copy of the model
            raise ConfigError(f"recipe {loaded.name} only evaluates: with --no-eval it has nothing to run; use "
                              "`compressdit evaluate` or drop --no-eval")
    if samples is not None:
        for stage in loaded.stages:
            if stage.name == "evaluate":
                stage.config.samples = samples
                stage.config.validate("--samples: evaluate")
    _run(loaded, model, out, overwrite, quiet, as_json, calib, text_encoder, embeddings, stream, max_memory, device,
         max_cache)


@app.command()
def quantize(model: str = MODEL, recipe: str = RECIPE, out: Path = OUT, calib: Optional[str] = CALIB,
             text_encoder: Optional[str] = TEXT_ENCODER, embeddings: Optional[Path] = EMBEDDINGS,
             no_eval: bool = NO_EVAL, samples: Optional[int] = SAMPLES, stream: bool = STREAM,
             max_memory: Optional[str] = MAX_MEMORY, device: str = DEVICE, max_cache: Optional[str] = MAX_CACHE,
             overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Quantize MODEL with a recipe and write a diffusers checkpoint + quality report."""
    _run_named_recipe(recipe, model, out, no_eval, samples, overwrite, quiet, as_json, calib, text_encoder, embeddings,
                      stream=stream, max_memory=max_memory, device=device, max_cache=max_cache)


@app.command()
def prune(model: str = MODEL, recipe: str = RECIPE, out: Path = OUT, calib: Optional[str] = CALIB,
          text_encoder: Optional[str] = TEXT_ENCODER, embeddings: Optional[Path] = EMBEDDINGS,
          no_eval: bool = NO_EVAL, samples: Optional[int] = SAMPLES, data: Optional[str] = DATA,
          overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Prune MODEL with a recipe — depth (tinyfusion-50, ppcl-50, blockinfluence-50) or width (width-30) — and write
    a diffusers checkpoint + quality report."""
    _run_named_recipe(recipe, model, out, no_eval, samples, overwrite, quiet, as_json, calib, text_encoder, embeddings,
                      data)


@app.command()
def moe(model: str = MODEL, recipe: str = RECIPE, out: Path = OUT, calib: Optional[str] = CALIB,
        text_encoder: Optional[str] = TEXT_ENCODER, embeddings: Optional[Path] = EMBEDDINGS,
        no_eval: bool = NO_EVAL, samples: Optional[int] = SAMPLES, data: Optional[str] = DATA,
        overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Turn MODEL's FFNs into mixtures of experts (dense2moe-50, dense2moe-62) or its blocks into a mixture of blocks
    (mob-50) with a recipe, distil them from the dense model and write a diffusers checkpoint + quality report."""
    _run_named_recipe(recipe, model, out, no_eval, samples, overwrite, quiet, as_json, calib, text_encoder, embeddings,
                      data)


@app.command("run")
def run_command(recipe_file: Path = typer.Argument(..., help="Recipe YAML file."),
                model: str = typer.Option(..., "--model", "-m", help="Model folder, zoo:NAME or hub id."),
                out: Path = typer.Option(..., "--out", "-o"),
                calib: Optional[str] = CALIB, text_encoder: Optional[str] = TEXT_ENCODER,
                embeddings: Optional[Path] = EMBEDDINGS, stream: bool = STREAM, max_memory: Optional[str] = MAX_MEMORY,
                device: str = DEVICE, max_cache: Optional[str] = MAX_CACHE, overwrite: bool = OVERWRITE,
                quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Run every stage of a recipe file."""
    from compressdit.recipe import load_recipe

    _run(load_recipe(str(recipe_file)), model, out, overwrite, quiet, as_json, calib, text_encoder, embeddings,
         stream, max_memory, device, max_cache)


@app.command()
def evaluate(candidate: str = typer.Argument(..., help="Compressed pipeline/model folder, or a GGUF file from "
                                                       "`export --format gguf`."),
             reference: str = typer.Option(..., "--reference", help="Uncompressed pipeline folder or zoo:NAME."),
             baseline: Optional[str] = typer.Option(None, "--baseline", help="Peer (bnb-int8, bnb-nf4, torchao-int8-dynamic, torchao-int8-weight, modelopt-int8-sq, modelopt-fp8, modelopt-int4-awq, modelopt-w4a8-awq) or recipe."),
             samples: int = typer.Option(256, "--samples"), steps: int = typer.Option(20, "--steps"),
             seed: int = typer.Option(0, "--seed"), guidance: float = typer.Option(4.0, "--guidance"),
             size: Optional[int] = typer.Option(None, "--size", help="Square resolution in pixels of a pipeline "
                                                "sampled through its own __call__ (no family adapter)."),
             out: Optional[Path] = typer.Option(None, "--out", help="Report folder (default CANDIDATE/report)."),
             text_encoder: Optional[str] = TEXT_ENCODER, embeddings: Optional[Path] = EMBEDDINGS,
             quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Compare CANDIDATE with its reference (and a baseline) at identical seeds; write a report."""
    from compressdit.cache import default_cache_dir
    from compressdit.evaluate.engine import Entry
    from compressdit.io.sources import load_source
    from compressdit.pipeline import evaluate_checkpoint
    from compressdit.quant.transform import quantized_modules
    from compressdit.stages.evaluate import EvaluateConfig

    set_quiet(quiet or as_json)
    config = EvaluateConfig.from_dict({"samples": samples, "steps": steps, "seed": seed, "guidance": guidance,
                                       "baseline": baseline, "size": size}, "evaluate")
    ref = load_source(reference, text_encoder=text_encoder, embeddings=None if embeddings is None else str(embeddings),
                      cache_dir=default_cache_dir())  # the reference's prompt encoder serves both
    if candidate.endswith(".gguf"):  # a GGUF export, dequantized with gguf's own reader
        from compressdit.io.gguf_read import read_gguf

        model, layers = read_gguf(candidate)
        entry = Entry("candidate", model, candidate, None, layers, disk_bytes=Path(candidate).stat().st_size)
        target = out or Path(candidate).with_name(Path(candidate).stem + "-report")
    else:
        cand = load_source(candidate)
        entry = Entry("candidate", cand.transformer, candidate, cand.transformer_folder,
                      sorted(quantized_modules(cand.transformer)))
        target = out or cand.folder / "report"
    report = evaluate_checkpoint(entry, ref, config, target, f"compressdit report: {candidate} vs {reference}", quiet,
                                 inputs=(candidate, reference, text_encoder, embeddings))
    if as_json:
        print(json.dumps({"report": str(target), "metrics": {m["name"]: m["values"] for m in report["metrics"]}},
                         indent=2))
    else:
        console.print(f"report: {target / 'report.html'}")


@app.command("distill")
def distill_command(student: str = typer.Argument(..., help="Compressed model or pipeline folder (the student)."),
                    teacher: str = typer.Option(..., "--teacher", help="Uncompressed model: folder or zoo:NAME."),
                    out: Path = typer.Option(..., "--out", "-o", help="Output folder (written atomically)."),
                    steps: Optional[int] = typer.Option(None, "--steps", help="Training steps (default 1000)."),
                    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch (default 64)."),
                    data: Optional[str] = DATA,
                    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="Pipeline folder whose "
                                                               "text encoders embed the prompts (default: TEACHER's "
                                                               "own, when it is a pipeline)."),
                    embeddings: Optional[Path] = EMBEDDINGS,
                    images: Optional[int] = typer.Option(None, "--images", help="Train on N latents: the first N "
                                                         "images of the data, or N teacher samples."),
                    max_minutes: Optional[float] = typer.Option(None, "--max-minutes",
                                                                help="Stop after this long; rerun to resume."),
                    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Resumable training state "
                                                           "(default: the cache, keyed by models and settings)."),
                    layer_map: Optional[str] = typer.Option(None, "--layer-map", help="Teacher block of each student "
                                                            "block for the feature loss, e.g. 0,2,4 (default: "
                                                            "proportional)."),
                    overwrite: bool = OVERWRITE, quiet: bool = QUIET, as_json: bool = JSON) -> None:
    """Distil STUDENT towards its uncompressed TEACHER (TinyFusion masked KD) and write it to OUT."""
    from compressdit.distill.sources import DataSpec
    from compressdit.pipeline import distill_checkpoint
    from compressdit.stages.distill import incomplete_message

    set_quiet(quiet or as_json)
    overrides = {key: value for key, value in {"steps": steps, "batch_size": batch_size,
                                               "max_minutes": max_minutes}.items() if value is not None}
    if data is not None or images is not None:
        spec = DataSpec.from_dict(data, "--data")
        overrides["data"] = (spec.with_images(images) if images is not None else spec).to_dict()
    if layer_map is not None and layer_map != "auto":
        try:
            overrides["layer_map"] = [int(v) for v in layer_map.split(",")]
        except ValueError:
            raise CompressditError(f"--layer-map: expected comma-separated block indices like 0,2,4, got "
                                   f"{layer_map!r}") from None
    metrics = distill_checkpoint(student, teacher, out, overrides, workdir, overwrite, quiet or as_json,
                                 text_encoder=text_encoder, embeddings=None if embeddings is None else str(embeddings))
    summary = {k: v for k, v in metrics.items() if k != "history"}
    if as_json:
        print(json.dumps(summary, indent=2))
    elif not metrics["completed"]:
        console.print(incomplete_message(metrics))
    else:
        final = ", ".join(f"{k} {v:.4g}" for k, v in metrics["final"].items() if k != "feature_weight")
        console.print(f"[bold green]wrote[/] {out} ({metrics['steps']} steps, {metrics['train_s']:.1f} s; {final})")


@app.command()
def inspect(model: str = typer.Argument(..., help="Checkpoint folder or zoo:NAME."), as_json: bool = JSON) -> None:
    """Per-module scheme, bits and bytes of a checkpoint."""
    from compressdit.inspect import inspect_checkpoint

    summary = inspect_checkpoint(model)
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{summary['class']} — {summary['quantized_modules']} quantized of "
                        f"{summary['linear_modules']} linear modules")
    for column in ("module", "scheme", "weight bytes", "vs bf16", "kernel (CPU)", "prepacked bytes"):
        table.add_column(column, justify="left" if column in ("module", "scheme", "kernel (CPU)") else "right")
    for row in summary["modules"]:
        table.add_row(row["module"], row["scheme"], str(row["bytes"]), f"{row['ratio_vs_bf16']:.2f}x", row["kernel"],
                      str(row["runtime_bytes"]))
    console.print(table)
    console.print(f"parameters: {summary['parameters']:,}  bytes on disk: {summary['bytes_on_disk']:,}  "
                  f"(bf16 would be {summary['bf16_bytes']:,})")


@app.command()
def export(model: str = typer.Argument(..., help="Checkpoint folder (compressdit or float), or zoo:NAME."),
           out: Path = typer.Option(..., "--out", "-o"),
           dequantize: bool = typer.Option(False, "--dequantize", help="Write plain float weights (no compressdit "
                                                                       "needed to load)."),
           fmt: Optional[str] = typer.Option(None, "--format", help="gguf: one transformer GGUF file (diffusers' "
                                                                    "GGUFQuantizationConfig, ComfyUI-GGUF)."),
           quant: str = typer.Option("Q8_0", "--quant", help="GGUF type of the linear weights: Q8_0, Q5_1, Q5_0, "
                                                             "Q4_1, Q4_0, Q5_K, Q4_K, or F16/BF16/F32."),
           names: Optional[str] = typer.Option(None, "--names", help="GGUF tensor names: original (BFL FLUX / SAI "
                                                                     "SD3, the default for those) or diffusers."),
           overwrite: bool = OVERWRITE, as_json: bool = JSON) -> None:
    """Export a checkpoint: ``--dequantize`` writes a plain diffusers folder, ``--format gguf`` a GGUF file."""
    if fmt is not None:
        _export_format(fmt, model, out, quant, names, overwrite, as_json)
        return
    from compressdit.inspect import export_dequantized

    if not dequantize:
        raise CompressditError("pass `--dequantize` (plain diffusers folder) or `--format gguf`: a quantized "
                               "checkpoint is already a diffusers folder")
    export_dequantized(model, out, overwrite)
    console.print(f"[bold green]wrote[/] {out} (plain diffusers weights)")


def _export_gguf(model: str, out: Path, quant: str, names: Optional[str], overwrite: bool, as_json: bool) -> None:
    from compressdit.io.gguf_export import export_gguf

    result = export_gguf(model, out, quant.upper(), names, overwrite)
    if as_json:
        print(json.dumps({"out": str(out), "arch": result.arch, "names": result.names, "types": result.counts(),
                          "note": result.note}))
        return
    types = ", ".join(f"{count} {qtype}" for qtype, count in sorted(result.counts().items()))
    console.print(f"[bold green]wrote[/] {out} ({result.model_class}, {result.names} names, "
                  f"general.architecture={result.arch}; tensors: {types})")
    if result.note:
        console.print(f"note: {result.note}")


EXPORT_FORMATS = {"gguf": _export_gguf}


def _export_format(fmt: str, model: str, out: Path, quant: str, names: Optional[str], overwrite: bool,
                  as_json: bool) -> None:
    if fmt not in EXPORT_FORMATS:
        raise CompressditError(f"--format {fmt}: known formats are {', '.join(EXPORT_FORMATS)} "
                               "(use --dequantize for a plain diffusers folder)")
    EXPORT_FORMATS[fmt](model, out, quant, names, overwrite, as_json)


@app.command("list")
def list_command(as_json: bool = JSON) -> None:
    """Registered recipes, formats, methods, stages, peers, model families and metrics."""
    import compressdit.evaluate.peers  # noqa: F401
    import compressdit.models  # noqa: F401
    import compressdit.quant.methods  # noqa: F401
    import compressdit.stages  # noqa: F401
    from compressdit.recipe import data_free_recipes, list_recipes
    from compressdit.registry import ALL_REGISTRIES

    listing = {kind: list(registry) for kind, registry in ALL_REGISTRIES.items()}
    listing["recipe"] = list_recipes()
    listing["on-the-fly recipe"] = data_free_recipes()  # what compressdit.recipe_config takes
    listing["metric"] = ["FD-FMNIST", "FD-EffNet", "class accuracy", "PSNR", "SSIM", "relative error per timestep",
                         "layer SQNR", "parameters", "bytes", "latency"]
    from compressdit.zoo.registry import ZOO

    listing["zoo model"] = list(ZOO)
    if as_json:
        print(json.dumps(listing, indent=2))
        return
    for kind, names in listing.items():
        console.print(f"[bold]{kind}[/]: {', '.join(names)}")


@zoo_app.command("list")
def zoo_list(as_json: bool = JSON) -> None:
    """Shipped reference models and whether their weights are present."""
    from compressdit.zoo.registry import ZOO, zoo_status

    status = {name: zoo_status(name) for name in ZOO}
    if as_json:
        print(json.dumps(status, indent=2))
        return
    for name, info in status.items():
        console.print(f"[bold]{name}[/]: {info['description']} — {'shipped' if info['present'] else 'not trained'}")


@zoo_app.command("train")
def zoo_train(name: str = typer.Argument(..., help="Zoo model name (see `compressdit zoo list`)."),
              max_minutes: Optional[float] = typer.Option(None, "--max-minutes",
                                                          help="Stop after this long; rerun to resume."),
              steps: Optional[int] = typer.Option(None, "--steps"),
              workdir: Path = typer.Option(Path("runs/zoo"), "--workdir", help="Resumable training state."),
              quiet: bool = QUIET) -> None:
    """Train a reference model from real Fashion-MNIST (resumable)."""
    from compressdit.zoo.registry import train

    set_quiet(quiet)
    result = train(name, workdir, max_minutes=max_minutes, steps=steps, quiet=quiet)
    if result is None:
        console.print(f"{name}: time cap reached, state saved in {workdir / name}; rerun to resume")
    else:
        console.print(f"{name}: done {json.dumps(result)}")


def _fail(message: str) -> None:
    """Print ``error: MESSAGE`` as exactly one line (no wrapping, no markup parsing) and exit 2."""
    from rich.markup import escape

    line = " ".join(part.strip() for part in message.strip().splitlines() if part.strip())
    err_console.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True, highlight=False)
    sys.exit(2)


_TERMINATED_BY: list[int] = []  # the signal that asked this process to end, once one has


def _terminated(signum, frame) -> None:
    """SIGTERM (``timeout``, a job scheduler, ``kill``) unwinds like Ctrl-C: temporary outputs are removed."""
    _TERMINATED_BY.append(signum)
    raise SystemExit(128 + signum)


def _interrupted(signum, frame) -> None:
    """Ctrl-C: Python's KeyboardInterrupt (click prints ``Aborted!``), remembered like SIGTERM."""
    _TERMINATED_BY.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    _TERMINATED_BY.clear()
    # restored on return: main() also runs in-process
    previous = {signum: signal.signal(signum, handler)
                for signum, handler in ((signal.SIGTERM, _terminated), (signal.SIGINT, _interrupted))}
    try:
        # not click's standalone mode: its usage errors (a missing argument, an option value of the wrong type) come
        # here and print one line like every other bad input, not click's usage box; --help and the like return
        # their exit code (the commands themselves return None)
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except BaseException as exc:
        if _TERMINATED_BY:
            # A library's bare ``except:`` can swallow the SystemExit / KeyboardInterrupt raised mid-import (dill
            # falls back to a ``import version`` that fails): whatever surfaced after the signal, the run ended by it.
            sys.exit(128 + _TERMINATED_BY[0])
        if isinstance(exc, click_errors.NoArgsIsHelpError):  # a bare command: its help, as click shows it
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click_errors.UsageError):
            where = exc.ctx.command_path if exc.ctx is not None else "compressdit"
            _fail(f"{exc.format_message()} (see `{where} --help`)")
        if isinstance(exc, click_errors.ClickException):
            _fail(exc.format_message())
        if isinstance(exc, typer.Abort):  # end of input at a prompt
            sys.exit(1)
        if isinstance(exc, CompressditError):
            _fail(str(exc) or type(exc).__name__)
        if isinstance(exc, (ValueError, KeyError, OSError, ImportError)):
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            _fail(f"{type(exc).__name__}: {message}")
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    main()
