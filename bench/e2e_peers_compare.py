"""Two runs of ``bench/e2e_peers.py`` side by side (e.g. the code before a change and after it): per model, batch
and variant, seconds per guided step and the ratio to the same run's fp32 (the ratios compare across runs: the
machine's speed drifts between them, each ratio is taken within its own run's rounds). Usage::

    python bench/e2e_peers.py ... --out /tmp/before      # on the old commit (a git worktree)
    python bench/e2e_peers.py ... --out /tmp/after       # on the new one, same arguments
    python bench/e2e_peers_compare.py /tmp/before.json /tmp/after.json --out bench/results/NAME --title "..."

writes ``NAME.json`` (both runs whole) and ``NAME.md``; ``--memory FILE.md ...`` (``load_memory.py``'s or
``peak_memory.py``'s markdown) appends those tables as they are.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_peers_report import machine_line  # noqa: E402


def _rows(run: dict) -> dict[tuple[str, int], dict]:
    return {(section["model"], section["batch"]): section["rows"] for section in run["sections"]}


def render(before: dict, after: dict, title: str, labels: tuple[str, str], memory: list[dict]) -> str:
    lines = [f"# {title}", "", f"- {labels[0]}: {machine_line(before['meta'])}",
             f"- {labels[1]}: {machine_line(after['meta'])}", "",
             "x fp32 = the run's fp32 seconds per step / the variant's, median over that run's interleaved rounds "
             "(`bench/e2e_peers.py`: random weights, speed only). after / before = the ratio of the two x fp32.", ""]
    old, new = _rows(before), _rows(after)
    for key in [k for k in new if k in old]:
        model, batch = key
        lines += [f"## {model}, batch {batch}", "",
                  f"| variant | {labels[0]} s / step | x fp32 | {labels[1]} s / step | x fp32 | after / before | kernels |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name, row in new[key].items():
            was = old[key].get(name)
            if was is None or "s_per_step" not in row or "s_per_step" not in was:
                continue
            change = row["speedup_vs_fp32"] / was["speedup_vs_fp32"]
            lines.append(f"| {name} | {was['s_per_step']:.3f} | {was['speedup_vs_fp32']:.2f}x | {row['s_per_step']:.3f} "
                         f"| {row['speedup_vs_fp32']:.2f}x | {change:.3f} | {row.get('kernels', '')} |")
        lines.append("")
    for table in memory:
        lines += [f"## {table.get('title', 'memory')}", "", table["markdown"].strip(), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--labels", nargs=2, default=["before", "after"])
    parser.add_argument("--title", default="End-to-end CPU step time, before and after")
    parser.add_argument("--memory", nargs="*", type=Path, default=[],
                        help="markdown files (e.g. load_memory.py's or peak_memory.py's) appended as they are")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    before, after = json.loads(args.before.read_text()), json.loads(args.after.read_text())
    memory = [{"title": path.stem, "markdown": path.read_text()} for path in args.memory]
    args.out.with_suffix(".json").write_text(json.dumps({"before": before, "after": after,
                                                         "labels": args.labels}, indent=1))
    args.out.with_suffix(".md").write_text(render(before, after, args.title, tuple(args.labels), memory))
    print(f"wrote {args.out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
