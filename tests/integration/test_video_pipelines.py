"""``compressdit quantize`` on real text-to-video pipeline folders with their own T5 (tiny CogVideoX and Wan, random
weights, built offline): calibration goes through the pipeline's own ``encode_prompt``; the output reloads with
stock ``DiffusionPipeline.from_pretrained`` and generates a video."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_real_pipelines import _prompt_cache, _quantize, cache, offline_env, small_w8a8  # noqa: F401

torch.set_num_threads(1)

CALL = {"cogvideox": dict(height=16, width=16, num_frames=9), "wan": dict(height=16, width=16, num_frames=3)}
FRAMES = {"cogvideox": 9, "wan": 3}


@pytest.mark.parametrize("family", ["cogvideox", "wan"])
def test_quantize_a_video_pipeline_through_its_own_text_encoder(family, text_pipeline_dir, small_w8a8, tmp_path,
                                                                 cache):  # noqa: F811
    summary = _quantize(text_pipeline_dir(family), tmp_path / "out", small_w8a8)
    assert summary["quantized_modules"] > 0 and "calibrate_s" in summary["timings"]
    assert len(_prompt_cache(cache)) == 5  # 4 calibration captions and the null prompt, encoded by the pipeline
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressdit"
    import compressdit  # noqa: F401  (registers the quantizer backend, as a user's import does)
    from diffusers import DiffusionPipeline

    from compressdit.quant.layers import QuantLinear

    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())
    pipe.set_progress_bar_config(disable=True)
    video = pipe("a red fox", num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0),
                 **CALL[family]).frames
    assert video.shape == (1, FRAMES[family], 3, 16, 16) and torch.isfinite(video).all()
