"""The orchestrator's checks that run before any work: the device and the evaluation's reference."""

from __future__ import annotations

import pytest
import torch

from compressdit.errors import ConfigError
from compressdit.evaluate.engine import Entry
from compressdit.io.sources import load_source
from compressdit.pipeline import check_device, check_same_family


def test_check_device_accepts_the_cpu():
    check_device("cpu")


@pytest.mark.parametrize("device, needle", [("tpu", "not a torch device"), ("cuda:banana", "not a torch device"),
                                            ("meta", "sees no meta device")])
def test_check_device_refuses_what_torch_cannot_run_on(device, needle):
    """``--device tpu --stream`` used to end in a RuntimeError traceback inside the shard reader."""
    with pytest.raises(ConfigError, match=needle):
        check_device(device)


def test_check_device_refuses_an_absent_cuda_device():
    """Without CUDA (or with fewer devices) the run stops before loading anything, not in the streamed reader."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(ConfigError, match="sees no cuda device" if count == 0 else "only"):
        check_device(f"cuda:{count}")


def test_evaluate_refuses_a_reference_of_another_family(dit_pipeline_dir, text_pipeline_dir):
    """A DiT checkpoint evaluated against an SD3 pipeline used to fail deep in sampling with an AttributeError."""
    dit = load_source(str(dit_pipeline_dir))
    sd3 = load_source(str(text_pipeline_dir("sd3")))
    with pytest.raises(ConfigError, match="DiTTransformer2DModel.*SD3Transformer2DModel.*--reference"):
        check_same_family(Entry("candidate", dit.transformer, "a DiT"), sd3)
    check_same_family(Entry("candidate", dit.transformer, "a DiT"), dit)


def test_check_float_names_the_stage_that_needs_float_weights(dit_pipeline_dir):
    from compressdit.io.diffusers_quantizer import attach_quantizer
    from compressdit.models import adapter_for
    from compressdit.pipeline import check_float
    from compressdit.quant.spec import LinearQuantSpec
    from compressdit.quant.transform import LayerRule, quantize_layers, resolve_plan

    model = load_source(str(dit_pipeline_dir)).transformer
    check_float("float", model, ["prune_width"])  # a float model passes every stage
    plan = resolve_plan(model, adapter_for(model), [LayerRule("re:.*", LinearQuantSpec(w_bits=8))])
    quantize_layers(model, plan)
    attach_quantizer(model, {n: s for n, s in plan.items() if s is not None})
    check_float("quantized", model, [])  # calibrate / quantize / evaluate run on it
    with pytest.raises(ConfigError, match=r"quantized is already quantized \(\d+ layers\) and moe trains"):
        check_float("quantized", model, ["moe", "distill"])
