"""The CLI's summary table prints every kind of report value (numbers and text such as each layer's kernel)."""

from __future__ import annotations

from types import SimpleNamespace

from compressdit.cli import _cell, _summary


def test_cell_formats_numbers_and_passes_text():
    assert _cell(None) == "—"
    assert _cell(0.123456789) == "0.123457"
    assert _cell(5729680) == "5.72968e+06"
    assert _cell("cpu-int8-gemm x84") == "cpu-int8-gemm x84"


def test_summary_prints_a_report_with_a_text_metric(tmp_path, capsys):
    report = {"columns": ["candidate", "reference"],
              "metrics": [{"name": "class accuracy", "values": {"candidate": 0.97, "reference": 0.96}},
                          {"name": "kernels", "values": {"candidate": "cpu-int8-gemm x84", "reference": None}}]}
    state = SimpleNamespace(report=report, workdir=tmp_path, recipe_name="w8a8", quant_specs={}, block_origin=None,
                            timings={}, notes=[])
    _summary(state, as_json=False)
    out = capsys.readouterr().out
    assert "cpu-int8-gemm x84" in out and "0.97" in out
