"""Markdown for ``bench/e2e_peers.py`` + ``bench/peak_memory.py``: one table per (model, batch) section, the
machine line, and sentences computed from the numbers (no hand-written claims that a rerun could contradict)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layer_kernels import cpu_flags, cpu_model  # noqa: E402


def machine(threads: int) -> dict:
    return {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "loadavg_start": [round(v, 2) for v in os.getloadavg()]}


def machine_line(meta: dict) -> str:
    from emulation import emulation_note

    return (f"CPU: {meta['cpu']} ({', '.join(meta['cpu_flags'])}), {meta['cores']} cores, {meta['threads']} "
            f"thread(s), torch {meta['torch']}{emulation_note(meta.get('emulate'), meta.get('capability', '?'))}; "
            f"run started {meta.get('started_utc', '?')} UTC; load average "
            f"before/after: {meta['loadavg_start']} / {meta.get('loadavg_end', '?')}")


def _fmt(value, spec: str = "", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def _memory_rows(memory: dict | None) -> dict:
    return {(r["model"], r["variant"]): r for r in (memory or {}).get("rows", [])}


def _rows(section: dict) -> list[dict]:
    """Rows in ``peer_models.VARIANTS`` order (float, compressdit recipes, peers), whatever group timed them."""
    from peer_models import VARIANTS

    order = list(VARIANTS)
    return sorted(section["rows"].values(), key=lambda r: order.index(r["variant"]) if r["variant"] in order else 99)


def section_lines(section: dict, memory: dict) -> list[str]:
    model = section["model"]
    show_memory = section["batch"] == 1
    rounds = ", ".join(f"{group}: {count}" for group, count in section["rounds"].items())
    lines = [f"## {model}, batch {section['batch']} ({section['cfg_rows']} CFG rows); rounds {rounds}", "",
             "| variant | s / step | x fp32 | compiled s / step | compiled x fp32 | graph breaks |"
             + (" peak RSS (MiB) | fp32 / peak |" if show_memory else "") + " kernels or error |",
             "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if show_memory else "") + "---|"]
    fp32_peak = memory.get((model, "fp32"), {}).get("vmhwm_mib")
    for row in _rows(section):
        compiled = row.get("compiled", {})
        mem = memory.get((model, row["variant"]), {})
        breaks = mem.get("graph_breaks")
        compile_cell = _fmt(compiled.get("s_per_step"), ".3f") if "compile_error" not in compiled else "failed"
        cells = [row["variant"], _fmt(row.get("s_per_step"), ".3f"), _fmt(row.get("speedup_vs_fp32"), ".2f", "x"),
                 compile_cell, _fmt(compiled.get("speedup_vs_fp32"), ".2f", "x"), _fmt(breaks)]
        if show_memory:
            peak = mem.get("vmhwm_mib")
            cells += [_fmt(peak, ".0f"), _fmt(fp32_peak / peak if peak and fp32_peak else None, ".2f", "x")]
        detail = row.get("error") or compiled.get("compile_error") or mem.get("error") or row.get("kernels", "")
        lines.append("| " + " | ".join(cells) + f" | {detail} |")
    return lines + [""]


def findings(result: dict, memory: dict) -> list[str]:
    """Sentences read off the numbers."""
    out = []
    for section in result["sections"]:
        rows = [r for r in _rows(section) if "speedup_vs_fp32" in r]
        if not rows:
            continue
        where = f"{section['model']} batch {section['batch']}"
        best = max(rows, key=lambda r: r["speedup_vs_fp32"])
        faster = [r["variant"] for r in rows if r["variant"] != "fp32" and r["speedup_vs_fp32"] > 1.05]
        level = [r["variant"] for r in rows if r["variant"] != "fp32" and 0.95 <= r["speedup_vs_fp32"] <= 1.05]
        out.append(f"- {where}: fastest eager variant {best['variant']} ({best['speedup_vs_fp32']:.2f}x fp32); "
                   f"more than 5% faster than fp32: {', '.join(faster) or 'none'}; within 5% of fp32: "
                   f"{', '.join(level) or 'none'}.")
        ours = [r for r in rows if r["note"].startswith("compressdit")]
        peers = [r for r in rows if r["variant"].startswith(("torchao", "bnb"))]
        if ours and peers:
            top_ours, top_peer = (max(g, key=lambda r: r["speedup_vs_fp32"]) for g in (ours, peers))
            out.append(f"  Best compressdit recipe {top_ours['variant']} {top_ours['speedup_vs_fp32']:.2f}x vs best "
                       f"peer {top_peer['variant']} {top_peer['speedup_vs_fp32']:.2f}x.")
        failed = [r["variant"] for r in _rows(section) if "error" in r]
        if failed:
            out.append(f"  Did not run: {', '.join(failed)} (error in the row).")
        gains = [f"{r['variant']} {r['speedup_vs_fp32']:.2f}x -> {r['compiled']['speedup_vs_fp32']:.2f}x"
                 for r in rows if "speedup_vs_fp32" in r.get("compiled", {})]
        if gains:
            out.append(f"  torch.compile (x fp32 eager, eager -> compiled): {'; '.join(gains)}.")
    for model in dict.fromkeys(m for m, _ in memory):
        fp32, w4 = memory.get((model, "fp32"), {}), memory.get((model, "w4a16"), {})
        if fp32.get("vmhwm_mib") and w4.get("vmhwm_mib"):
            ratio = fp32["vmhwm_mib"] / w4["vmhwm_mib"]
            out.append(f"- {model} peak RSS: fp32 {fp32['vmhwm_mib']:.0f} MiB vs w4a16 {w4['vmhwm_mib']:.0f} MiB = "
                       f"{ratio:.2f}x smaller ({'at least' if ratio >= 1.5 else 'less than'} 1.5x).")
        breaks = {v: r.get("graph_breaks") for (m, v), r in memory.items() if m == model and "graph_breaks" in r}
        if breaks:
            nonzero = {v: b for v, b in breaks.items() if b}
            out.append(f"- {model} graph breaks (torch._dynamo.explain of one step, 2-block copy): "
                       + (", ".join(f"{v} {b}" for v, b in nonzero.items()) if nonzero else
                          f"0 for all {len(breaks)} variants traced") + ".")
    return out


def write_markdown(base: Path) -> None:
    result = json.loads(base.with_suffix(".json").read_text())
    memory_path = base.with_name(base.name.replace("e2e_peers", "peak_memory") + ".json")
    memory_json = json.loads(memory_path.read_text()) if memory_path.exists() else None
    memory = _memory_rows(memory_json)
    meta = result["meta"]
    lines = ["# End-to-end CPU step time: compressdit recipes vs torchao / bitsandbytes (random weights)", "",
             machine_line(meta) + ".", "",
             "One guided denoising step = one forward over 2 x batch rows (conditional + unconditional). Every "
             "variant is built from the same seeded float weights and quantizes the same layers (all but embedders "
             "and head; `bench/peer_models.py` says how each is built). Variants, and the torch.compile'd copies "
             "at batch 1, are timed in interleaved rounds; x fp32 = fp32 eager time / variant time within a round, "
             "median over rounds (compiled columns are also against fp32 eager). Random weights: speed and memory "
             "only, never quality (see `speed_quality_cpu.md` for quality on the trained reference model).", "",
             "To bound memory, the variants are built and timed in groups, one group in memory at a time: "
             + "; ".join(f"group {i + 1}: {g.replace(',', ', ')}" for i, g in enumerate(meta.get("groups", [])))
             + ". fp32 runs in every round of every group (its row shows group 1's run) and every ratio is taken "
             "against the fp32 run of the same round. Warm-up: one batch-1 step per variant (the build's check, and "
             "the compile) before the rounds.", ""]
    if meta.get("layers") != "real depth":
        lines += [f"**Smoke run: {meta['layers']} blocks per model, not the real depth.**", ""]
    if memory_json:
        lines += ["Peak RSS = `VmHWM` of a fresh process per variant that builds the model block by block from "
                  "`meta` (each fp32 block converted as soon as it exists), runs one batch-1 step, and reads "
                  "/proc/self/status, each child with `MALLOC_MMAP_THRESHOLD_="
                  f"{memory_json['meta'].get('mmap_threshold')}` (freed large blocks go back to the OS); graph "
                  "breaks = `torch._dynamo.explain` of the same step on a 2-block copy of the variant (every block "
                  f"runs the same code). Memory run: {machine_line(memory_json['meta'])}.", ""]
        refreshed = memory_json["meta"].get("refreshed")
        if refreshed:
            lines += [f"{refreshed['model']} rows of {', '.join(refreshed['variants'])} measured again "
                      f"{refreshed['started_utc']} UTC (load average {refreshed['loadavg_start']} / "
                      f"{refreshed['loadavg_end']}): {refreshed['note']}.", ""]
        default = memory_json["meta"].get("glibc_default_run")
        if default:
            lines += [f"With glibc's default allocator settings ({default['note']}, {default['model']}): "
                      + ", ".join(f"{v} {m:.0f} MiB" for v, m in default["vmhwm_mib"].items())
                      + ": temporaries freed while quantizing stay in glibc's heap and count in VmHWM.", ""]
    notes = {r["variant"]: r["note"] for section in result["sections"] for r in _rows(section)}
    lines += ["Variants:", ""] + [f"- **{name}**: {note}" for name, note in notes.items()] + [
        "- compressdit recipes use each recipe's layer rules and specs with unit calibration statistics and "
        "min-max ranges (these change values, not layouts or kernels); `vq-w3` gets random codes and codebooks of "
        "the recipe's shape (at DiT-XL/2 size, VQ4DiT's k-means alone took 225 s and each calibration step 41 s "
        "on this CPU, `vq_quantization_time_cpu.md`): its row is speed only; `w4a8` runs "
        "without the recipe's mixed precision (all layers W4A8).", ""]
    for section in result["sections"]:
        lines += section_lines(section, memory)
    lines += [f"Note: {note}" for note in meta.get("notes", [])] + ([""] if meta.get("notes") else [])
    if meta.get("not_run"):
        lines += [f"Not run before the deadline: {', '.join(meta['not_run'])}.", ""]
    lines += ["## What the numbers show", ""] + findings(result, memory) + [""]
    base.with_suffix(".md").write_text("\n".join(lines))
