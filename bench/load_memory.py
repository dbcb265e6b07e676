"""Peak memory and time of quantizing a float checkpoint as diffusers loads it (``from_pretrained(...,
quantization_config=...)``), ours and the peers' backends, on real-size architectures with random weights.

The float model is saved once, in bfloat16 (as real checkpoints ship), to ``--cache``; each variant then loads it in
a fresh Python process (one thread, ``MALLOC_MMAP_THRESHOLD_`` as in ``peak_memory.py``) and reports ``VmHWM`` (the
process's peak resident memory: the checkpoint's tensors, the float layers, the quantized ones), the resident
memory after loading, ``get_memory_footprint()`` and the load time. Ours keep the embedders and the head float (the
recipes' rules); bitsandbytes and torchao quantize every linear. Usage::

    python bench/load_memory.py                          # writes bench/results/load_memory_cpu.{json,md}
    python bench/load_memory.py --models "DiT-XL/2 256px" --variants "float fp32" "compressdit rtn-w8a8"
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
from peak_memory import status_mib  # noqa: E402

# variant -> (torch_dtype name, quantization config builder name, argument)
VARIANTS = {
    "float fp32": ("float32", None, None),
    "float bf16": ("bfloat16", None, None),
    "compressdit rtn-w8a8": ("float32", "compressdit", "rtn-w8a8"),
    "compressdit rtn-w8a8 (bf16)": ("bfloat16", "compressdit", "rtn-w8a8"),
    "compressdit rtn-w4a16 (bf16)": ("bfloat16", "compressdit", "rtn-w4a16"),
    "compressdit rtn-w4a8 (bf16)": ("bfloat16", "compressdit", "rtn-w4a8"),
    "compressdit nvfp4 (bf16)": ("bfloat16", "compressdit", "nvfp4"),
    "torchao int8 weight-only (bf16)": ("bfloat16", "torchao", "Int8WeightOnlyConfig"),
    "torchao int8 dynamic (bf16)": ("bfloat16", "torchao", "Int8DynamicActivationInt8WeightConfig"),
    # bitsandbytes' diffusers quantizer refuses without a GPU ("No GPU found. A GPU is needed for quantization.")
    "bnb int8 (bf16)": ("bfloat16", "bnb", "int8"),
}
DEFAULT_VARIANTS = [name for name in VARIANTS if not name.startswith("bnb")]


def quantization_config(kind: str | None, argument: str | None):
    if kind is None:
        return None
    if kind == "compressdit":
        import compressdit

        return compressdit.recipe_config(argument)
    if kind == "bnb":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True) if argument == "int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4")
    import torchao.quantization
    from diffusers import TorchAoConfig

    return TorchAoConfig(getattr(torchao.quantization, argument)())


def save_float(model_name: str, cache: Path) -> Path:
    """The model with seeded random weights, saved in bfloat16 once (one shard, as ``save_pretrained`` writes it)."""
    import diffusers
    import torch

    from peer_models import MODELS

    folder = cache / model_name.replace("/", "-").replace(" ", "_")
    if (folder / "config.json").exists():
        return folder
    class_name, config = MODELS[model_name]
    torch.manual_seed(0)
    model = getattr(diffusers, class_name)(**config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


class AnonPeak:
    """The largest ``RssAnon`` seen while the block runs, sampled every ``period`` seconds by a thread: the memory
    that is the process's own (``VmHWM`` also counts the checkpoint's pages that the kernel maps from the page cache
    and can drop again: a bfloat16 load that keeps the file mapped is resident only where touched)."""

    def __init__(self, period: float = 0.002) -> None:
        self.period, self.peak, self.running = period, 0.0, False

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, status_mib("RssAnon"))
            time.sleep(self.period)

    def __enter__(self) -> "AnonPeak":
        import threading

        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, status_mib("RssAnon"))


def measure_one(folder: Path, variant: str) -> dict:
    import diffusers
    import torch

    import compressdit  # noqa: F401  (registers the backend, quiets the peers' import-time notes)

    torch.set_num_threads(1)
    dtype, kind, argument = VARIANTS[variant]
    class_name = json.loads((folder / "config.json").read_text())["_class_name"]
    config = quantization_config(kind, argument)
    before = status_mib("RssAnon")
    started = time.perf_counter()
    with AnonPeak() as peak:
        model = getattr(diffusers, class_name).from_pretrained(folder, torch_dtype=getattr(torch, dtype),
                                                               quantization_config=config)
    seconds = time.perf_counter() - started
    return {"variant": variant, "anon_before_mib": before, "anon_peak_mib": peak.peak,
            "anon_after_mib": status_mib("RssAnon"), "file_after_mib": status_mib("RssFile"),
            "vmhwm_mib": status_mib("VmHWM"), "footprint_mib": round(model.get_memory_footprint() / 2**20, 1),
            "load_s": round(seconds, 2)}


def run_child(folder: Path, variant: str, timeout: int, mmap_threshold: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_=str(mmap_threshold))
    try:
        done = subprocess.run([sys.executable, __file__, "--one", str(folder), variant], capture_output=True,
                              text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"variant": variant, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def write_markdown(result: dict, path: Path) -> None:
    from e2e_peers_report import machine_line

    lines = ["# Quantizing while loading: memory and time (CPU)", "",
             "`from_pretrained(bf16 checkpoint, torch_dtype=..., quantization_config=...)` in a fresh process per "
             "row, one thread. Anonymous memory (`RssAnon`: the process's own, sampled every 2 ms during the load "
             "for its peak) net of what the process held before the load (torch, diffusers); `file` is the "
             "checkpoint's pages mapped from the page cache after the load (resident where touched, droppable); "
             "footprint is `get_memory_footprint()` (our layers' prepacked kernel copies are not in it, they are in "
             "`anon after`). Load seconds include quantizing and prepacking; `MALLOC_MMAP_THRESHOLD_` (set so that freed "
             "temporaries leave the process) gives every large temporary fresh pages, so they run slower than in a "
             "default process (DiT-XL/2 rtn-w8a8 bf16: 4.5 s there). " + machine_line(result["meta"]) + "." +
             "".join(f" Rows added by a later run (started {run['started_utc']} UTC): {run['rows']}."
                     for run in result["meta"].get("runs", [])), "",
             "| model | variant | peak anon MiB | anon after | file after | footprint MiB | load s |",
             "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['variant']} | {row['error']} | | | | |")
            continue
        base = row["anon_before_mib"]
        lines.append(f"| {row['model']} | {row['variant']} | {row['anon_peak_mib'] - base:.0f} | "
                     f"{row['anon_after_mib'] - base:.0f} | {row['file_after_mib']:.0f} | {row['footprint_mib']:.0f} "
                     f"| {row['load_s']:.1f} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    from peer_models import MODELS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("FOLDER", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/compressdit-load-bench"))
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--mmap-threshold", type=int, default=131072)
    parser.add_argument("--out", type=Path, default=RESULTS / "load_memory_cpu.json")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(Path(args.one[0]), args.one[1])), flush=True)
        return
    from e2e_peers_report import machine

    result = {"meta": {**machine(1), "mmap_threshold": args.mmap_threshold,
                       "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")},
              "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        folder = save_float(model_name, args.cache)
        for variant in args.variants:
            row = {"model": model_name, **run_child(folder, variant, args.timeout, args.mmap_threshold)}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            result["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out.with_suffix(".md"))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
