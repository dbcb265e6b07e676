"""The evaluation engine on a user's own (colour) pipeline: the zoo's Fashion-MNIST metrics do not apply."""

from __future__ import annotations

import copy

import torch

from compressdit.evaluate.engine import Entry, EvalSettings, evaluate
from compressdit.io.sources import load_source
from compressdit.models import adapter_for

torch.set_num_threads(1)


def test_a_colour_pipeline_is_compared_with_its_reference_only(text_pipeline_dir, tmp_path):
    """A stock SD3 pipeline decodes RGB: the grayscale Fashion-MNIST classifier used to fail on its images
    (``conv2d ... expected 1 channel``); the report now keeps the fidelity metrics and says what it left out."""
    source = load_source(str(text_pipeline_dir("sd3")), cache_dir=tmp_path)
    reference = Entry("reference", source.transformer, "the reference")
    twin = Entry("candidate", copy.deepcopy(source.transformer), "a perturbed copy", compressed_layers=["proj_out"])
    with torch.no_grad():
        twin.model.proj_out.weight.mul_(1.1)
    settings = EvalSettings(samples=2, steps=1, timing_batch=2, fidelity_samples=2, effnet=False)
    report = evaluate(adapter_for(source.transformer), reference, twin, None, source.vae, source.scheduler, settings,
                      quiet=True, cache_dir=tmp_path, prompt_encoder=source.prompt_encoder)
    metrics = {m["name"]: m["values"] for m in report["metrics"]}
    assert not [name for name in metrics if "FMNIST" in name or "accuracy" in name or "real test" in name]
    psnr = metrics["PSNR vs reference (same seeds)"]["candidate"]
    assert psnr is not None and 0 < psnr < 100  # a perturbed copy: finite, not identical
    assert report["settings"]["real test images"] == 0
    assert any("3-channel" in note and "class accuracy" in note for note in report["notes"])
