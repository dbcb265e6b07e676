"""Sampling through a pipeline's own ``__call__`` (families without a compressdit adapter): the step tracking hook,
the adapter choice, per-sample seeds, and the stock trajectory the statistics hooks see."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

from compressdit.errors import ConfigError, UnsupportedModelError
from compressdit.models import adapter_for
from compressdit.models.driven import DrivenAdapter, denoising_steps
from compressdit.models.generic import GenericAdapter
from compressdit.models.sampling import sample


class _Echo(nn.Module):
    def forward(self, hidden_states, timestep=None):
        return hidden_states


def test_denoising_steps_counts_runs_of_one_timestep():
    """Two calls per step (cond + uncond as separate calls, as Chroma's pipeline makes them) count once; the last
    step is reported on leaving; the hook is gone afterwards."""
    model, seen = _Echo(), []
    with denoising_steps(model, lambda i, t, x, p: seen.append((i, float(t)))):
        for t in (1.0, 1.0, 0.5, 0.5, 0.25):
            model(torch.zeros(1), timestep=torch.tensor([t, t]))
    assert seen == [(0, 1.0), (1, 0.5), (2, 0.25)]
    model(torch.zeros(1), timestep=torch.tensor([0.1]))
    assert len(seen) == 3 and not model._forward_pre_hooks
    seen.clear()
    with denoising_steps(model, lambda i, t, x, p: seen.append((i, float(t)))):
        for t in (900.0, 800.0):  # by position, as HunyuanDiT's pipeline calls its transformer
            model(torch.zeros(1), torch.tensor([t]))
    assert seen == [(0, 900.0), (1, 800.0)]


def test_a_transformer_called_without_timestep_is_refused():
    model = _Echo()
    with pytest.raises(UnsupportedModelError, match="timestep"):
        with denoising_steps(model, None):
            model(torch.zeros(1))


@pytest.fixture(scope="module")
def auraflow(text_pipeline_dir):
    from diffusers import AuraFlowTransformer2DModel

    folder = text_pipeline_dir("auraflow")
    return folder, AuraFlowTransformer2DModel.from_pretrained(folder / "transformer").eval()


def test_pipeline_folder_gets_the_driven_adapter(auraflow):
    folder, model = auraflow
    assert isinstance(adapter_for(model, folder), DrivenAdapter)
    bare = adapter_for(model)
    assert type(bare) is GenericAdapter and not bare.drives_pipeline
    assert type(adapter_for(model, folder / "transformer")) is GenericAdapter  # no model_index.json there


def test_driven_sampling_is_the_stock_pipeline_with_per_sample_seeds(auraflow):
    """Latents equal the stock pipeline's for the same per-sample generators, whatever the batch size; every
    step reaches ``on_step`` once per pipeline call."""
    from diffusers import DiffusionPipeline

    folder, model = auraflow
    adapter = adapter_for(model, folder)
    adapter.set_call(64, None)
    prompts = ["a red fox", "a grey cat", "a boat"]
    steps_seen = []
    together = sample(adapter, model, prompts, None, steps=3, guidance=4.0, seed=5, batch_size=3,
                      on_step=lambda i, t, x, p: steps_seen.append(i))
    apart = sample(adapter, model, prompts, None, steps=3, guidance=4.0, seed=5, batch_size=2)
    assert steps_seen == [0, 1, 2] and together.shape == (3, 4, 8, 8)
    torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-5)
    stock = DiffusionPipeline.from_pretrained(folder, transformer=model)
    stock.set_progress_bar_config(disable=True)
    expected = stock(prompts[1], num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
                     output_type="latent", generator=torch.Generator().manual_seed(6)).images
    torch.testing.assert_close(together[1:2], expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="latents"):
        sample(adapter, model, prompts, None, steps=1, latents=torch.zeros(3, 4, 8, 8))
    with pytest.raises(ConfigError, match="prompts"):
        sample(adapter, model, [3, 4], None, steps=1)


def test_driven_adapter_refuses_single_step_probes(auraflow):
    folder, model = auraflow
    adapter = adapter_for(model, folder)
    with pytest.raises(UnsupportedModelError, match="mixed precision probes"):
        adapter.predict(model, torch.zeros(1, 4, 8, 8), torch.tensor([1.0]), None)


#: tiny pipelines of families without an adapter (``tests/tiny_driven_pipelines.py``), sampled guided in their
#: own ``__call__``
FAMILIES = ["qwenimage", "sana", "sana-sprint", "lumina2", "cogview4", "hunyuandit", "mochi", "allegro", "easyanimate",
            "hunyuanvideo"]
HAS_FTFY = importlib.util.find_spec("ftfy") is not None  # SkyReels-V2's pipeline calls it unguarded
if HAS_FTFY:
    FAMILIES.append("skyreels-v2")


def _driven(text_pipeline_dir, family: str):
    from compressdit.io.sources import load_transformer
    from tests.tiny_driven_pipelines import CALLS

    folder = text_pipeline_dir(family)
    model = load_transformer(folder / "transformer", None)
    adapter = adapter_for(model, folder)
    adapter.set_call(*CALLS.get(family, (64, {})))
    return folder, model, adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_families_sample_guided_through_their_own_call(family, text_pipeline_dir):
    """Two denoising steps reach ``on_step`` however the pipeline splits guidance into transformer calls, the
    guidance scale reaches the pipeline (the guided latents differ from unguided ones) and latents are finite."""
    folder, model, adapter = _driven(text_pipeline_dir, family)
    assert isinstance(adapter, DrivenAdapter)
    prompts, seen = ["a red fox", "a grey cat"], []
    guided = sample(adapter, model, prompts, None, steps=2, guidance=4.0, seed=0, batch_size=2,
                    on_step=lambda i, t, x, p: seen.append(i))
    plain = sample(adapter, model, prompts, None, steps=2, guidance=1.0, seed=0, batch_size=2)
    assert seen == [0, 1] and guided.shape[0] == 2 and torch.isfinite(guided).all()
    assert (guided - plain).norm() > 1e-4 * guided.norm()


def test_qwen_image_guidance_is_true_cfg_with_a_negative_prompt(text_pipeline_dir):
    """Qwen-Image guides only with ``true_cfg_scale`` and a negative prompt: two transformer calls per step, the
    stock pipeline's latents for those keywords."""
    from diffusers import DiffusionPipeline

    folder, model, adapter = _driven(text_pipeline_dir, "qwenimage")
    calls = []
    with denoising_steps(model) as counter:
        handle = model.register_forward_hook(lambda m, a, o: calls.append(counter.step))
        latents = sample(adapter, model, ["a red fox", "a grey cat"], None, steps=2, guidance=4.0, seed=3,
                         batch_size=2)
        handle.remove()
    assert calls == [0, 0, 1, 1]
    stock = DiffusionPipeline.from_pretrained(folder, transformer=model)
    stock.set_progress_bar_config(disable=True)
    expected = stock(["a grey cat"], negative_prompt=[""], true_cfg_scale=4.0, num_inference_steps=2, height=64,
                     width=64, output_type="latent", generator=torch.Generator().manual_seed(4)).images
    torch.testing.assert_close(latents[1:], expected, rtol=1e-4, atol=1e-5)


def test_sana_samples_the_size_asked_and_refused_sizes_are_one_line(text_pipeline_dir):
    """A size turns Sana's resolution binning off (it would sample its 512 px bin); a size the pipeline refuses,
    or a default its binning cannot serve, is one line naming the pipeline and its reason."""
    folder, model, adapter = _driven(text_pipeline_dir, "sana")
    assert sample(adapter, model, ["a red fox"], None, steps=1, guidance=4.0).shape == (1, 4, 16, 16)
    adapter.set_call(48, None)
    with pytest.raises(ConfigError, match=r"SanaPipeline.__call__ failed with size 48: .*divisible by 32"):
        sample(adapter, model, ["a red fox"], None, steps=1)
    folder, model, adapter = _driven(text_pipeline_dir, "sana-sprint")
    adapter.set_call(None, None)  # its default binning knows no bins for the tiny sample size
    with pytest.raises(ConfigError, match=r"SanaSprintPipeline.__call__ failed with size default: Invalid sample"):
        sample(adapter, model, ["a red fox"], None, steps=1)


def test_a_pipeline_missing_an_optional_package_is_one_line(text_pipeline_dir, monkeypatch):
    from diffusers.pipelines.skyreels_v2 import pipeline_skyreels_v2

    monkeypatch.delattr(pipeline_skyreels_v2, "ftfy", raising=False)  # the module as without ftfy, installed or not
    folder, model, adapter = _driven(text_pipeline_dir, "skyreels-v2")
    with pytest.raises(UnsupportedModelError, match=r"SkyReelsV2Pipeline.__call__ failed .*'ftfy'.*: pip install ftfy"):
        sample(adapter, model, ["a red fox"], None, steps=1)
