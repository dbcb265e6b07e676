"""Peak memory (VmHWM) of a fresh process per variant that builds, quantizes and runs one guided step, and the
``torch._dynamo.explain`` graph-break count of that step.

Each (model, variant) runs in its own Python process: the model is built block by block from ``meta``
(``peer_models.build``: an fp32 block is materialised, then converted, so the process never holds the whole
fp32 model unless the variant is fp32), one CFG step at batch 1 runs, and ``VmHWM`` is read from
``/proc/self/status``; graph breaks are counted on a 2-block copy (the blocks run the same code). Each child runs with ``MALLOC_MMAP_THRESHOLD_=131072`` (``--mmap-threshold``): with glibc's
default, temporaries freed while quantizing stay in the heap and count in VmHWM (on DiT-XL/2 w4a16 measured
3105 MiB against fp32's 3435 MiB that way). Only then does ``torch._dynamo.explain`` trace the step (its memory is not counted).
Usage::

    python bench/peak_memory.py                # writes bench/results/peak_memory_cpu.json, refreshes e2e_peers_cpu.md
    python bench/peak_memory.py --quick        # 2 blocks, DiT-XL/2 only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RESULTS = ROOT / "bench" / "results"
from emulation import EMULATIONS, emulate  # noqa: E402


def status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def measure_one(model_name: str, variant: str, layers: int | None, explain: bool, explain_layers: int = 2) -> dict:
    import torch

    from peer_models import VARIANTS, build, one_step, step_inputs

    torch.set_num_threads(1)
    baseline = status_mib("VmRSS")
    model, adapter, info = build(model_name, variant, layers)
    inputs = step_inputs(adapter, model, 1, VARIANTS[variant].dtype)
    one_step(adapter, model, inputs)
    result = {"model": model_name, "variant": variant, "vmhwm_mib": status_mib("VmHWM"),
              "vmrss_after_step_mib": status_mib("VmRSS"), "rss_before_build_mib": baseline,
              **info}
    if explain:  # on a copy of ``explain_layers`` blocks: every block runs the same code, so a break in one
        del model, inputs  # shows in the first; tracing all 28 blocks costs minutes per variant
        model, adapter, _ = build(model_name, variant, explain_layers)
        inputs = step_inputs(adapter, model, 1, VARIANTS[variant].dtype)
        result["explain_layers"] = explain_layers
        report = torch._dynamo.explain(lambda: one_step(adapter, model, inputs))()
        result["graph_breaks"] = report.graph_break_count
        result["graphs"] = report.graph_count
        result["break_reasons"] = sorted({str(b.reason).splitlines()[0][:160] for b in report.break_reasons})
    return result


def run_child(model_name: str, variant: str, layers: int | None, explain: bool, timeout: int,
              mmap_threshold: int) -> dict:
    command = [sys.executable, __file__, "--one", model_name, variant] + (["--layers", str(layers)] if layers else [])
    command += [] if explain else ["--no-explain"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if mmap_threshold:  # large blocks from mmap go back to the OS when freed (no glibc heap retention)
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": model_name, "variant": variant, "error": f"timed out after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"model": model_name, "variant": variant, "error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def main() -> None:
    from peer_models import MODELS, VARIANTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--no-explain", action="store_true", help="skip the graph-break count")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ of each child (0: glibc's default, which keeps freed "
                             "quantization temporaries in its heap and so in VmHWM)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--append", action="store_true", help="keep --out's rows of the other models")
    parser.add_argument("--out", type=Path, default=RESULTS / "peak_memory_cpu.json")
    parser.add_argument("--emulate", choices=sorted(EMULATIONS), default=None,
                        help="run as on a lesser CPU (bench/emulation.py): the children inherit its environment")
    args = parser.parse_args()
    emulate(args.emulate)
    if args.one:
        print(json.dumps(measure_one(*args.one, args.layers, not args.no_explain)), flush=True)
        return
    if args.quick:
        args.layers, args.models = 2, [next(iter(MODELS))]
        args.out = args.out.with_name(args.out.stem + "_quick.json")
    from e2e_peers_report import machine, write_markdown

    import torch

    result = {"meta": {**machine(1), "emulate": args.emulate, "capability": torch.backends.cpu.get_cpu_capability(),
                       "layers": args.layers or "real depth", "mmap_threshold": args.mmap_threshold,
                       "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")},
              "rows": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.exists():  # keep the rows of models this run does not measure
        previous = json.loads(args.out.read_text())
        result["rows"] = [r for r in previous["rows"] if r["model"] not in args.models]
        result["meta"]["earlier_runs"] = previous["meta"].get("earlier_runs", []) + [
            {k: previous["meta"].get(k) for k in ("started_utc", "loadavg_start", "loadavg_end")}]
    for model_name in args.models:
        for variant in args.variants:
            row = run_child(model_name, variant, args.layers, not args.no_explain, args.timeout, args.mmap_threshold)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            result["meta"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
            args.out.write_text(json.dumps(result, indent=2) + "\n")
    e2e = args.out.with_name(args.out.name.replace("peak_memory", "e2e_peers").replace(".json", ""))
    if "peak_memory" in args.out.name and e2e.with_suffix(".json").exists():  # its peers table's peak column
        write_markdown(e2e)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
