"""``compressdit export --dequantize`` (compressdit.inspect.export_dequantized) on models it cannot make plain."""

from __future__ import annotations

import pytest

from compressdit.errors import UnsupportedModelError
from compressdit.inspect import export_dequantized


def test_a_model_with_non_stock_layers_is_refused_and_nothing_written(tmp_path):
    """A width-pruned, MoE or MoB model keeps its structure manifest after dequantize(): the folder written used
    to be announced as plain diffusers weights but failed to load without compressdit ("Unknown quantization
    type"). It is refused instead, as GGUF export refuses it."""
    from compressdit.io.save import record_structure
    from tests.moe.test_mob import _routed

    _, model = _routed()
    record_structure(model)
    model.save_pretrained(tmp_path / "mob")
    with pytest.raises(UnsupportedModelError, match=r"non-stock layers \(mob in quantization_config.structure\)"):
        export_dequantized(str(tmp_path / "mob"), tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mob"]
