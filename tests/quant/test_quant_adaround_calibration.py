"""``rounding: adaround`` through the spec, under method rtn (compressdit.quant.adaround_calibration)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressdit.errors import CalibrationError
from compressdit.io.sources import ModelSource
from compressdit.models import adapter_for
from compressdit.quant.fp_layer import MinifloatLinear
from compressdit.quant.transform import quantized_modules
from compressdit.stages import STAGES
from compressdit.stages.base import PipelineState
from tests.conftest import tiny_dit

SPEC = {"format": "e2m1", "w_bits": 4, "group_size": 32, "rounding": "adaround"}


def _run(calibrate: bool = True) -> tuple[PipelineState, torch.nn.Module]:
    model = tiny_dit(layers=1)
    adapter = adapter_for(model)
    source = ModelSource("tiny", Path("."), model, scheduler=adapter.scheduler(model))
    state = PipelineState(source=source, adapter=adapter, model=model, workdir=Path("."), reference_spec="tiny",
                          quiet=True)
    if calibrate:
        STAGES.get("calibrate").run(state, STAGES.get("calibrate").parse({"samples": 2, "steps": 2}, "calibrate"))
    rules = [{"match": "role:embedder", "spec": None},
             {"match": "proj_out_2", "spec": SPEC},  # outside every block: reconstructed alone
             {"match": "role:head", "spec": None},
             {"match": "re:.*", "spec": SPEC}]
    quantize = STAGES.get("quantize")
    quantize.run(state, quantize.parse({"method": "rtn", "rules": rules}, "quantize"))
    return state, model


def test_rtn_method_reconstructs_blocks_and_lone_layers_for_adaround_specs():
    state, model = _run()
    layers = quantized_modules(model)
    assert "proj_out_2" in layers and "transformer_blocks.0.ff.net.2" in layers
    assert all(isinstance(m, MinifloatLinear) and m.spec.rounding == "adaround" for m in layers.values())
    table = next(t for t in state.tables if t["title"].startswith("adaround:"))
    rows = {row[0]: row for row in table["rows"]}
    assert set(rows) == {"transformer_blocks.0", "proj_out_2"}
    assert rows["transformer_blocks.0"][1] == 7 and rows["proj_out_2"][1] == 1
    for _, _, calls, rtn_error, ada_error, kept in table["rows"]:
        assert calls > 0 and (ada_error < rtn_error) == (kept == "adaround")
    assert any(note.startswith("adaround: 8 layers in 2 blocks") for note in state.notes)


def test_adaround_without_calibration_is_a_clear_error():
    with pytest.raises(CalibrationError, match="needs a calibrate stage"):
        _run(calibrate=False)
