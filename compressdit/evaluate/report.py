"""Render a quality report from a plain dict into ``report.json``, ``report.md`` and ``report.html``.

Schema of the ``report`` dict (``*`` = required, everything else optional)::

    title*    str
    created   ISO-8601 str; defaults to the current UTC time
    reference / candidate / baseline   str | None -- description of each model
    settings  {str: scalar}           -- samples, steps, seed, guidance, ...
    columns   [str]                   -- column keys in display order; default
                                         candidate, reference (+ baseline when described)
    metrics*  [{"name": str, "unit": str = "", "better": "lower" | "higher" | None,
                "values": {column: number | None}}]          -- None renders as "—"
    per_timestep_error  {"timesteps": [number], "series": {column: [number]}}
    layer_sqnr          {"layers": [str], "series": {column: [number]}}
    images    {column: Tensor | ndarray [N, C, H, W] in [-1, 1] | path of a PNG}
    notes     [str]
    tables    [{"title": str, "header": [str], "rows": [[cell]]}]

``write_report`` writes, into ``out_dir``: ``samples_<column>.png`` per image entry,
``error_per_timestep.png`` and ``layer_sqnr.png`` when those entries exist, ``report.json``
(the dict with ``images`` mapped to PNG file names, plus ``figures``: plot name -> PNG file
name; non-finite floats stored as the strings "inf", "-inf", "nan"), ``report.md`` (links
the PNGs) and ``report.html`` (self-contained: inline CSS, PNGs as base64 data URIs).
In the metrics tables the better of candidate and baseline is shown in bold.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressdit.plots import new_axes

_ARROW = {"lower": " ↓", "higher": " ↑", None: ""}
_FIGURE_TITLES = (("error_per_timestep", "Error per timestep"), ("layer_sqnr", "Per-layer SQNR"))
_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;"
    "padding:.3em .7em}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "th{background:#f3f3f3}.row{display:flex;flex-wrap:wrap;gap:1.5em}figure{margin:0}"
    "figcaption{text-align:center;font-size:.9em}img.grid{width:320px;image-rendering:pixelated}"
    "img.plot{max-width:100%}"
)


def image_grid(
    images: torch.Tensor | np.ndarray, nrow: int, padding: int = 2, pad_value: float = 1.0
) -> np.ndarray:
    """Tile ``[N, C, H, W]`` images in ``[-1, 1]`` with ``nrow`` images per row.

    Returns uint8 ``[H, W]`` for one channel or ``[H, W, 3]`` for three.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    arr = np.asarray(images, np.float32)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3) or arr.shape[0] == 0:
        raise ValueError(f"image_grid: expected a non-empty [N, 1 or 3, H, W] batch, got shape {arr.shape}")
    if nrow < 1:
        raise ValueError(f"image_grid: nrow must be >= 1, got {nrow}")
    n, c, h, w = arr.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    shape = (rows * (h + padding) + padding, cols * (w + padding) + padding, c)
    canvas = np.full(shape, pad_value, np.float32)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        canvas[top : top + h, left : left + w] = arr[i].transpose(1, 2, 0)
    pixels = np.round((np.clip(canvas, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)
    return pixels[..., 0] if c == 1 else pixels


def save_png(array: np.ndarray, path: Path) -> Path:
    """Write a uint8 ``[H, W]`` or ``[H, W, 3]`` array as a PNG file."""
    from PIL import Image

    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"save_png: expected uint8 [H, W] or [H, W, 3], got {array.dtype} {array.shape}")
    Image.fromarray(array).save(path, format="PNG")
    return Path(path)


def _finite(values: list[Any]) -> np.ndarray:
    arr = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    arr[~np.isfinite(arr)] = np.nan  # an infinite SQNR (identical layer) cannot be drawn
    return arr


def _strip_common_prefix(names: list[str]) -> tuple[str, list[str]]:
    """Drop the dotted path components shared by all names (kept when only one name exists)."""
    parts = [name.split(".") for name in names]
    shared = 0
    while len(parts) > 1 and all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    prefix = ".".join(parts[0][:shared]) + "." if shared else ""
    return prefix, [".".join(p[shared:]) for p in parts]


def _plot_series(
    axis: list[Any], series: dict[str, list[Any]], columns: list[str], path: Path, kind: str
) -> None:
    """Line plot of each series over timesteps (kind "timestep") or layer names (kind "layer")."""
    colors = {col: f"C{i}" for i, col in enumerate(columns)}
    n = len(axis)
    if kind == "timestep":
        fig, ax = new_axes(7.0, 4.0)
        xs = np.asarray(axis, dtype=np.float64)
        if n > 1 and xs[0] > xs[-1]:
            ax.invert_xaxis()  # keep sampling order left to right
        ax.set_xlabel("timestep")
        ax.set_ylabel("relative error vs reference")
    else:
        fig, ax = new_axes(min(max(7.0, 2.0 + 0.17 * n), 20.0), 5.0)
        xs = np.arange(n)
        prefix, labels = _strip_common_prefix([str(name) for name in axis])
        labels = [name if len(name) <= 32 else "…" + name[-31:] for name in labels]
        ax.set_xlabel(f"layer (common prefix '{prefix}' omitted)" if prefix else "layer")
        ax.set_xticks(xs, labels, rotation=90, fontsize=8 if n <= 30 else 6 if n <= 60 else 5)
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylabel("SQNR vs reference [dB]")
    positive = True
    for name, values in series.items():
        ys = _finite(values)
        positive &= bool(np.all(ys[~np.isnan(ys)] > 0))
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.2, label=name, color=colors.get(name))
    if kind == "timestep" and positive:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _check_series(block: Any, axis_key: str, where: str) -> tuple[list[Any], dict[str, list[Any]]]:
    if not isinstance(block, dict) or axis_key not in block or not isinstance(block.get("series"), dict):
        raise ValueError(f"report['{where}'] must be a dict with '{axis_key}' and 'series' entries")
    axis = list(block[axis_key])
    series = {str(k): list(v) for k, v in block["series"].items()}
    for name, values in series.items():
        if len(values) != len(axis):
            raise ValueError(
                f"report['{where}']['series']['{name}'] has {len(values)} values but "
                f"'{axis_key}' has {len(axis)}"
            )
    return axis, series


def _jsonable(obj: Any, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, (np.generic, np.ndarray)):
        return _jsonable(obj.tolist(), where)
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.detach().cpu().tolist(), where)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"report{where}: a {type(obj).__name__} cannot be stored in report.json")


def _number(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    return None


def format_value(value: Any) -> str:
    """Human-readable cell text: "—" for None, precision chosen by magnitude."""
    if value is None:
        return "—"
    number = _number(value)
    if number is None or isinstance(value, (int, np.integer)):
        return str(value)
    if math.isnan(number):
        return "nan"
    if math.isinf(number):
        return "∞" if number > 0 else "-∞"
    size = abs(number)
    if size == 0:
        return "0"
    if size >= 1e6 or size < 1e-3:
        return f"{number:.3e}"
    return f"{number:.1f}" if size >= 100 else f"{number:.3f}" if size >= 1 else f"{number:.4f}"


def _winner(metric: dict[str, Any]) -> str | None:
    """Column ("candidate" or "baseline") with the strictly better value, if comparable."""
    better, values = metric.get("better"), metric.get("values", {})
    cand, base = _number(values.get("candidate")), _number(values.get("baseline"))
    if better not in ("lower", "higher") or cand is None or base is None:
        return None
    if math.isnan(cand) or math.isnan(base) or cand == base:
        return None
    return "candidate" if (cand < base) == (better == "lower") else "baseline"


def _normalise(report: dict[str, Any]) -> dict[str, Any]:
    for key in ("title", "metrics"):
        if key not in report:
            raise ValueError(f"report is missing the required key '{key}'")
    rep = dict(report)
    rep.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    default_cols = ["candidate", "reference"] + (["baseline"] if rep.get("baseline") else [])
    rep["columns"] = [str(c) for c in rep.get("columns") or default_cols]
    for i, metric in enumerate(rep["metrics"]):
        if not isinstance(metric, dict) or "name" not in metric or not isinstance(metric.get("values"), dict):
            raise ValueError(f"report['metrics'][{i}] must be a dict with 'name' and a 'values' dict")
        if metric.get("better") not in ("lower", "higher", None):
            raise ValueError(
                f"report['metrics'][{i}]['better'] must be 'lower', 'higher' or None, "
                f"got {metric['better']!r}"
            )
    return rep


def _metric_label(metric: dict[str, Any]) -> str:
    unit = f" [{metric['unit']}]" if metric.get("unit") else ""
    return f"{metric['name']}{unit}{_ARROW[metric.get('better')]}"


def _md_table(header: list[Any], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows] + [""]


def _metric_rows(rep: dict[str, Any]) -> list[tuple[str, list[tuple[str, bool]]]]:
    """Per metric: its label and, per column, the cell text and whether it is the better one."""
    rows = []
    for metric in rep["metrics"]:
        winner = _winner(metric)
        cells = [(format_value(metric["values"].get(col)), col == winner) for col in rep["columns"]]
        rows.append((_metric_label(metric), cells))
    return rows


def _settings_rows(rep: dict[str, Any]) -> list[list[str]]:
    return [[str(k), format_value(v)] for k, v in (rep.get("settings") or {}).items()]


def _model_rows(rep: dict[str, Any]) -> list[list[str]]:
    return [[col, str(rep[col])] for col in rep["columns"] if isinstance(rep.get(col), str)]


def _figure_titles(rep: dict[str, Any]) -> list[tuple[str, str]]:
    extra = [(_slug(title), title) for title in (rep.get("extra_figures") or {})]
    return list(_FIGURE_TITLES) + extra


def _slug(title: str) -> str:
    return "fig_" + "".join(c if c.isalnum() else "_" for c in title.lower()).strip("_")


def _render_markdown(rep: dict[str, Any], images: dict[str, str], figures: dict[str, str]) -> str:
    out = [f"# {rep['title']}", "", f"Created: {rep['created']}", ""]
    if _model_rows(rep):
        out += ["## Models", ""] + _md_table(["Column", "Model"], _model_rows(rep), numeric_from=2)
    if _settings_rows(rep):
        out += ["## Settings", ""] + _md_table(["Setting", "Value"], _settings_rows(rep))
    rows = _metric_rows(rep)
    metrics = [[label, *(f"**{t}**" if best else t for t, best in cells)] for label, cells in rows]
    out += ["## Metrics", ""] + _md_table(["Metric", *rep["columns"]], metrics)
    if images:
        links = [f"- {col}: ![{col} samples]({name})" for col, name in images.items()]
        out += ["## Samples (same seeds)", ""] + links + [""]
    for key, title in _figure_titles(rep):
        if key in figures:
            out += [f"## {title}", "", f"![{title}]({figures[key]})", ""]
    if rep.get("notes"):
        out += ["## Notes", ""] + [f"- {note}" for note in rep["notes"]] + [""]
    for table in rep.get("tables") or []:
        rows = [[format_value(c) for c in row] for row in table["rows"]]
        out += [f"## {table['title']}", ""] + _md_table(list(table["header"]), rows)
    return "\n".join(out)


def _html_table(header: list[Any], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)

    def row_html(row: list[str]) -> str:
        return "".join(f"<td{' class=num' if i >= numeric_from else ''}>{c}</td>" for i, c in enumerate(row))

    body = "".join(f"<tr>{row_html(row)}</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _render_html(rep: dict[str, Any], images: dict[str, str], figures: dict[str, str], out_dir: Path) -> str:
    esc = html.escape

    def escaped(rows: list[list[str]]) -> list[list[str]]:
        return [[esc(c) for c in row] for row in rows]

    parts = [f"<h1>{esc(str(rep['title']))}</h1>", f"<p>Created: {esc(str(rep['created']))}</p>"]
    if _model_rows(rep):
        models = _html_table(["Column", "Model"], escaped(_model_rows(rep)), numeric_from=2)
        parts += ["<h2>Models</h2>", models]
    if _settings_rows(rep):
        parts += ["<h2>Settings</h2>", _html_table(["Setting", "Value"], escaped(_settings_rows(rep)))]
    metrics = [
        [esc(label)] + [f"<strong>{esc(t)}</strong>" if best else esc(t) for t, best in cells]
        for label, cells in _metric_rows(rep)
    ]
    parts += ["<h2>Metrics</h2>", _html_table(["Metric", *rep["columns"]], metrics)]
    if images:
        def caption(col: str) -> str:
            return esc(col) + (f": {esc(rep[col])}" if isinstance(rep.get(col), str) else "")

        figs = "".join(
            f"<figure><img class=grid alt='{esc(col)} samples' src='{_data_uri(out_dir / name)}'>"
            f"<figcaption>{caption(col)}</figcaption></figure>"
            for col, name in images.items()
        )
        parts += ["<h2>Samples (same seeds)</h2>", f"<div class=row>{figs}</div>"]
    for key, title in _figure_titles(rep):
        if key in figures:
            img = f"<img class=plot alt='{title}' src='{_data_uri(out_dir / figures[key])}'>"
            parts += [f"<h2>{title}</h2>", img]
    if rep.get("notes"):
        items = "".join(f"<li>{esc(str(note))}</li>" for note in rep["notes"])
        parts += ["<h2>Notes</h2>", f"<ul>{items}</ul>"]
    for table in rep.get("tables") or []:
        rows = [[esc(format_value(c)) for c in row] for row in table["rows"]]
        parts += [f"<h2>{esc(str(table['title']))}</h2>", _html_table(list(table["header"]), rows)]
    title = esc(str(rep["title"]))
    return (
        f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )


def _write_images(rep: dict[str, Any], out_dir: Path) -> dict[str, str]:
    names: dict[str, str] = {}
    entries = rep.get("images") or {}
    for col in [c for c in rep["columns"] if c in entries] + [c for c in entries if c not in rep["columns"]]:
        value, target = entries[col], out_dir / f"samples_{col}.png"
        if isinstance(value, (str, Path)):
            source = Path(value)
            if not source.is_file() or source.suffix.lower() != ".png":
                raise FileNotFoundError(f"report['images']['{col}']: {source} is not an existing .png file")
            if source.resolve() != target.resolve():
                shutil.copyfile(source, target)
        else:
            n = len(value)
            save_png(image_grid(value, nrow=max(1, math.ceil(math.sqrt(n)))), target)
        names[col] = target.name
    return names


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write the report files into ``out_dir``; returns their paths keyed by kind.

    Keys: ``json``, ``markdown``, ``html``, ``samples_<column>``, ``error_per_timestep``,
    ``layer_sqnr`` (the last ones only when the report has that content).
    """
    rep, out_dir = _normalise(report), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = _write_images(rep, out_dir)
    figures: dict[str, str] = {}
    plots = (
        ("per_timestep_error", "timesteps", "timestep", "error_per_timestep"),
        ("layer_sqnr", "layers", "layer", "layer_sqnr"),
    )
    for key, axis_key, kind, name in plots:
        if rep.get(key) is not None:
            axis, series = _check_series(rep[key], axis_key, key)
            _plot_series(axis, series, rep["columns"], out_dir / f"{name}.png", kind)
            figures[name] = f"{name}.png"
    for title, path in (rep.get("extra_figures") or {}).items():  # plots made by a stage (e.g. sensitivity)
        name = _slug(title)
        shutil.copyfile(path, out_dir / f"{name}.png")
        figures[name] = f"{name}.png"
    kept = {k: v for k, v in rep.items() if k != "extra_figures"}
    stored = _jsonable({**kept, "images": images, "figures": figures}, "")
    paths = {
        "json": out_dir / "report.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"
    }
    text = json.dumps(stored, indent=2, ensure_ascii=False, allow_nan=False)
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["markdown"].write_text(_render_markdown(rep, images, figures), encoding="utf-8")
    paths["html"].write_text(_render_html(rep, images, figures, out_dir), encoding="utf-8")
    paths.update({f"samples_{col}": out_dir / name for col, name in images.items()})
    paths.update({key: out_dir / name for key, name in figures.items()})
    return paths
