"""Tests for compressdit.evaluate.report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressdit.evaluate import report as rp

torch.set_num_threads(1)


def _report(**extra: object) -> dict:
    g = torch.Generator().manual_seed(0)
    base = {
        "title": "w4a8 vs fp32",
        "created": "2025-01-01T00:00:00+00:00",
        "reference": "fp32 DiT",
        "candidate": "w4a8 smooth",
        "baseline": "w4a8 rtn",
        "settings": {"samples": 16, "steps": 20, "seed": 0, "guidance": 1.5},
        "columns": ["candidate", "reference", "baseline"],
        "metrics": [
            {"name": "FD-FMNIST vs test set", "unit": "", "better": "lower",
             "values": {"candidate": 3.1, "reference": 2.9, "baseline": 5.0}},
            {"name": "PSNR vs reference", "unit": "dB", "better": "higher",
             "values": {"candidate": 21.5, "reference": None, "baseline": 24.25}},
            {"name": "Classifier accuracy", "unit": "", "better": None,
             "values": {"candidate": 0.91, "reference": 0.93, "baseline": 0.88}},
        ],
        "per_timestep_error": {"timesteps": [999, 500, 1], "series": {"candidate": [0.1, 0.05, 0.02],
                                                                     "baseline": [0.2, 0.1, 0.04]}},
        "layer_sqnr": {"layers": [f"blocks.{i}.attn.qkv" for i in range(12)],
                       "series": {"candidate": [30.0 + i for i in range(12)],
                                  "baseline": [20.0] * 11 + [float("inf")]}},
        "images": {"candidate": torch.rand(9, 1, 32, 32, generator=g) * 2 - 1,
                   "reference": np.zeros((9, 1, 32, 32), np.float32),
                   "baseline": torch.rand(9, 1, 32, 32, generator=g) * 2 - 1},
        "notes": ["final layer kept in full precision"],
        "tables": [{"title": "Per-module schemes", "header": ["module", "scheme"],
                    "rows": [["blocks.0.attn.qkv", "w4a8"], ["final", "fp32"]]}],
    }
    base.update(extra)
    return base


def _metric_row(markdown: str, name: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith(f"| {name}"))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_writes_all_files_and_json_holds_metrics(tmp_path: Path) -> None:
    paths = rp.write_report(_report(), tmp_path)
    names = {"report.json", "report.md", "report.html", "error_per_timestep.png", "layer_sqnr.png",
             "samples_candidate.png", "samples_reference.png", "samples_baseline.png"}
    assert {p.name for p in paths.values()} == names
    assert {p.name for p in tmp_path.iterdir()} == names
    data = json.loads(paths["json"].read_text())
    assert [m["name"] for m in data["metrics"]] == [m["name"] for m in _report()["metrics"]]
    assert data["metrics"][1]["values"]["reference"] is None
    assert data["images"] == {c: f"samples_{c}.png" for c in ("candidate", "reference", "baseline")}
    assert data["figures"] == {"error_per_timestep": "error_per_timestep.png", "layer_sqnr": "layer_sqnr.png"}
    assert data["layer_sqnr"]["series"]["baseline"][-1] == "inf"
    assert Image.open(paths["samples_candidate"]).size == (3 * 34 + 2, 3 * 34 + 2)


def test_markdown_table_rows_and_bold_marks_better_of_candidate_and_baseline(tmp_path: Path) -> None:
    md = rp.write_report(_report(), tmp_path)["markdown"].read_text()
    assert _metric_row(md, "Metric") == ["Metric", "candidate", "reference", "baseline"]
    assert _metric_row(md, "FD-FMNIST vs test set") == ["FD-FMNIST vs test set ↓", "**3.100**", "2.900", "5.000"]
    assert _metric_row(md, "PSNR vs reference") == ["PSNR vs reference [dB] ↑", "21.500", "—", "**24.250**"]
    assert _metric_row(md, "Classifier accuracy") == ["Classifier accuracy", "0.9100", "0.9300", "0.8800"]
    for png in ("samples_candidate.png", "error_per_timestep.png", "layer_sqnr.png"):
        assert f"]({png})" in md
    assert "final layer kept in full precision" in md and "| blocks.0.attn.qkv | w4a8 |" in md
    assert "fid" not in md.lower()


def test_html_is_self_contained_with_embedded_pngs(tmp_path: Path) -> None:
    page = rp.write_report(_report(), tmp_path)["html"].read_text()
    assert page.count("data:image/png;base64,") == 5
    assert not re.search(r"src=['\"](?!data:)", page) and "<link" not in page
    assert "<strong>3.100</strong>" in page and "<strong>24.250</strong>" in page
    assert "—" in page and "Per-module schemes" in page


def test_minimal_report_and_png_path_images(tmp_path: Path) -> None:
    png = rp.save_png(np.full((8, 8), 200, np.uint8), tmp_path / "given.png")
    rep = {"title": "t", "metrics": [{"name": "m", "values": {"candidate": None}}],
           "images": {"reference": str(png)}}
    paths = rp.write_report(rep, tmp_path / "out")
    assert set(paths) == {"json", "markdown", "html", "samples_reference"}
    assert paths["samples_reference"].read_bytes() == png.read_bytes()
    data = json.loads(paths["json"].read_text())
    assert data["columns"] == ["candidate", "reference"] and data["figures"] == {}
    assert _metric_row(paths["markdown"].read_text(), "m") == ["m", "—", "—"]


def test_invalid_reports_explain_themselves(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'metrics'"):
        rp.write_report({"title": "t"}, tmp_path)
    bad = _report(layer_sqnr={"layers": ["a", "b"], "series": {"candidate": [1.0]}})
    with pytest.raises(ValueError, match="has 1 values but 'layers' has 2"):
        rp.write_report(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="not an existing .png"):
        rp.write_report(_report(images={"candidate": tmp_path / "missing.png"}), tmp_path)


def test_image_grid_layout_and_values() -> None:
    imgs = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    grid = rp.image_grid(imgs, nrow=2, padding=1, pad_value=-1.0)
    assert grid.shape == (2 * 5 + 1, 2 * 5 + 1) and grid.dtype == np.uint8
    assert grid[1, 1] == 0 and grid[1, 6] == 128 and grid[6, 1] == 255 and grid[6, 6] == 0
    rgb = rp.image_grid(torch.zeros(2, 3, 4, 4), nrow=4)
    assert rgb.shape == (4 + 4, 2 * 6 + 2, 3)


def test_format_value() -> None:
    assert [rp.format_value(v) for v in (None, 7, 1234.56, 2.5, 0.1234, 1e-5, float("inf"))] == [
        "—", "7", "1234.6", "2.500", "0.1234", "1.000e-05", "∞"]
