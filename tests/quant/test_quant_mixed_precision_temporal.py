"""ViDiT-Q-MP's temporal group: layers an adapter gives the ``temporal`` role are scored by temporal fidelity
(relative error of frame-to-frame differences of the final latents) and normalised among themselves.

CogVideoX and Wan use full 3D attention (no temporal role); Latte's adapter declares one (its calibrated
``w4a8`` run: tests/models/test_video_compression.py); the adapter here declares one on a tiny Wan."""

from __future__ import annotations

import torch

from compressdit.evaluate.metrics import relative_error
from compressdit.models.sampling import sample
from compressdit.models.text_conditions import synthetic_text
from compressdit.models.wan import WanAdapter
from compressdit.quant.context import QuantContext
from compressdit.quant.formats import FORMATS
from compressdit.quant.mixed_precision import MixedPrecisionConfig, measure_sensitivity, sensitivity_group
from compressdit.quant.spec import LinearQuantSpec
from compressdit.quant.transform import set_module
from tests.models.test_video_adapters import TEXT_DIM, TEXT_SEQ, _model

TEMPORAL = r"blocks\.\d+\.attn1\.to_[qkv]"


class _TemporalWan(WanAdapter):
    """Wan with its self-attention q/k/v called temporal attention (as a family with separate temporal
    attention, e.g. Latte's temporal blocks, would declare), and synthetic null conditions."""

    roles = {"temporal": (TEMPORAL,), **{r: p for r, p in WanAdapter.roles.items() if r != "attn_qkv"}}

    def null_conditions(self, count):
        return synthetic_text(count, TEXT_SEQ, TEXT_DIM, seed=99)


class _NoFrames(_TemporalWan):
    frame_axis = None


def test_groups_by_role_and_frame_axis() -> None:
    adapter = _TemporalWan()
    assert sensitivity_group(adapter, "blocks.0.attn1.to_q") == "temporal"
    assert sensitivity_group(adapter, "blocks.0.attn2.to_k") == "condition"
    assert sensitivity_group(adapter, "blocks.0.ffn.net.2") == "image"
    assert sensitivity_group(WanAdapter(), "blocks.0.attn1.to_q") == "image"  # full 3D attention: no temporal
    assert sensitivity_group(_NoFrames(), "blocks.0.attn1.to_q") == "image"  # no frame axis to measure along


def test_temporal_layers_are_scored_by_frame_difference_fidelity() -> None:
    model, adapter = _model("wan"), _TemporalWan()
    conditions = synthetic_text(2, TEXT_SEQ, TEXT_DIM, seed=1)
    ctx = QuantContext(adapter=adapter, scheduler=adapter.scheduler(model), conditions=conditions, quiet=True)
    names = ["blocks.0.attn1.to_q", "blocks.1.attn1.to_v", "blocks.0.attn2.to_k", "blocks.0.ffn.net.2"]
    spec = LinearQuantSpec(w_bits=3)
    config = MixedPrecisionConfig(probe_samples=2, probe_steps=2, guidance=3.0)
    results = {s.name: s for s in measure_sensitivity(model, {n: spec for n in names}, ctx, config)}
    assert {n: s.group for n, s in results.items()} == {
        "blocks.0.attn1.to_q": "temporal", "blocks.1.attn1.to_v": "temporal",
        "blocks.0.attn2.to_k": "condition", "blocks.0.ffn.net.2": "image"}
    temporal = [results["blocks.0.attn1.to_q"], results["blocks.1.attn1.to_v"]]
    assert max(s.normalised for s in temporal) > 1.0 - 1e-9  # normalised within the temporal group only

    def run():
        return sample(adapter, model, conditions, ctx.scheduler, steps=2, guidance=3.0, seed=config.seed)

    reference = run()
    original = model.get_submodule("blocks.0.attn1.to_q")
    set_module(model, "blocks.0.attn1.to_q", FORMATS.get(spec.format).quantize(original, spec, None))
    try:
        quantized = run()
    finally:
        set_module(model, "blocks.0.attn1.to_q", original)
    expected = relative_error(torch.diff(quantized, dim=2), torch.diff(reference, dim=2))
    assert expected > 0 and results["blocks.0.attn1.to_q"].damage == expected
