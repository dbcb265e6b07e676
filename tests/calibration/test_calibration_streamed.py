"""Calibration with the blocks streamed from the shards gives the in-memory statistics, one block in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressdit.calibration.streamed import BlockStreamer, streamed_calibration
from compressdit.io.shards import LazyWeights
from compressdit.io.sources import load_source
from compressdit.models import adapter_for
from compressdit.stages.calibrate import CalibrateConfig, run_calibration
from compressdit.streaming import skeleton
from tests.conftest import folder_state


@pytest.fixture(scope="module")
def flux_pipeline(text_pipeline_dir):
    return text_pipeline_dir("flux")


@pytest.mark.parametrize("family", ["dit", "flux"])
def test_streamed_statistics_equal_the_in_memory_ones(family, dit_pipeline_dir, flux_pipeline, tmp_path):
    """DiT calls its first block's ``norm1.emb`` after the block loop (kept in memory); FLUX brings its own T5 and
    CLIP (the prompt encoder of the pipeline folder). 3 samples in one batch with guidance, 2 steps."""
    folder = {"dit": dit_pipeline_dir, "flux": flux_pipeline}[family]
    config = CalibrateConfig(samples=3, steps=2, batch_size=4, guidance=2.0)
    state = folder_state(folder, tmp_path)
    state.cache_dir = None
    expected = run_calibration(state, config)
    model = skeleton(Path(folder) / "transformer")
    source = load_source(str(folder), transformer=model)
    stats, streamer, conditions = streamed_calibration(source, adapter_for(model), LazyWeights(
        Path(folder) / "transformer"), config, quiet=True)
    blocks = len(adapter_for(model).blocks(model))
    assert streamer.peak == 1 and streamer.loads == blocks * config.steps
    assert conditions == state.calibration_conditions and stats.timesteps == expected.timesteps
    assert stats.absmax.keys() == expected.absmax.keys() and stats.meansq.keys() == expected.meansq.keys()
    assert all(torch.equal(stats.absmax[k], expected.absmax[k]) for k in expected.absmax)
    assert all(torch.equal(stats.meansq[k], expected.meansq[k]) for k in expected.meansq)
    assert all(t.is_meta for t in model.state_dict().values())  # everything read went back to meta


def test_two_batches_read_each_block_once_per_step_and_batch(dit_pipeline_dir):
    model = skeleton(Path(dit_pipeline_dir) / "transformer")
    source = load_source(str(dit_pipeline_dir), transformer=model)
    _, streamer, _ = streamed_calibration(source, adapter_for(model), LazyWeights(
        Path(dit_pipeline_dir) / "transformer"), CalibrateConfig(samples=3, steps=2, batch_size=2), quiet=True)
    assert streamer.peak == 1 and streamer.loads == 2 * 2 * 2


def test_a_failing_block_leaves_nothing_in_memory_and_no_hooks(dit_model_dir):
    model = skeleton(Path(dit_model_dir))
    adapter = adapter_for(model)
    x, t, cond = torch.zeros(1, 4, 8, 8), torch.tensor([10]), adapter.synthetic_conditioning(model, 1)

    def fail(module, args):
        raise RuntimeError("attention failed")

    with pytest.raises(RuntimeError, match="attention failed"), \
            BlockStreamer(model, adapter, LazyWeights(Path(dit_model_dir))) as streamer:
        adapter.predict(model, x, t, cond)
        assert streamer.peak == 1 and streamer.loads == 2 and not streamer.live
        model.transformer_blocks[1].attn1.register_forward_pre_hook(fail)
        adapter.predict(model, x, t, cond)
    assert streamer.loads == 4 and not streamer.live and all(v.is_meta for v in model.state_dict().values())
    assert not any(b._forward_pre_hooks or b._forward_hooks for _, b in adapter.blocks(model))


def test_blocks_resident_part_and_buffers_run_on_the_streamer_s_device(dit_model_dir):
    """``device="meta"`` stands in for a GPU here: each block is read onto it as it is called, the resident part
    and the model's own buffers (DiT's sin-cos table) are there, activations flow there; on exit the buffers are
    back on the CPU and the weights on ``meta``."""
    model = skeleton(Path(dit_model_dir))
    adapter = adapter_for(model)
    cond = adapter.synthetic_conditioning(model, 1).to(torch.device("meta"), torch.float32)
    x, t = torch.zeros(1, 4, 8, 8, device="meta"), torch.tensor([10], device="meta")
    seen = []
    with BlockStreamer(model, adapter, LazyWeights(Path(dit_model_dir)), device="meta") as streamer:
        for _, block in adapter.blocks(model):  # after the streamer's hooks: sees the block as read
            block.register_forward_pre_hook(lambda m, args: seen.append({p.device.type for p in m.parameters()}
                                                                        | {args[0].device.type}))
        assert model.pos_embed.pos_embed.is_meta
        out = adapter.predict(model, x, t, cond)
    assert out.is_meta and streamer.loads == 2 and seen == [{"meta"}, {"meta"}]
    assert model.pos_embed.pos_embed.device.type == "cpu"
    assert all(t.is_meta for t in model.state_dict().values())
