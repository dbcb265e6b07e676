"""How pipelines take what compressdit passes their ``__call__``: guidance keywords per pipeline class (subclasses
inherit), resolution binning off under a given size, the preparation a family's example does, missing packages."""

from __future__ import annotations

import pytest

from compressdit.models.pipeline_calls import (STOCK, TRUE_CFG, guidance_call, missing_package, prepare,
                                               size_options)


def test_guidance_keywords_per_pipeline_class():
    from diffusers import FluxPipeline, HunyuanVideoPipeline, PixArtAlphaPipeline, QwenImagePipeline

    class MyQwen(QwenImagePipeline):
        pass

    assert guidance_call(QwenImagePipeline) is TRUE_CFG and guidance_call(MyQwen) is TRUE_CFG
    assert guidance_call(HunyuanVideoPipeline) is TRUE_CFG
    assert guidance_call(PixArtAlphaPipeline) is STOCK and guidance_call(FluxPipeline) is STOCK
    assert TRUE_CFG.options(4.0, 3) == {"true_cfg_scale": 4.0, "negative_prompt": ["", "", ""]}
    assert TRUE_CFG.options(1.0, 3) == {"true_cfg_scale": 1.0}  # no guidance: no negative prompt, no warning
    assert STOCK.options(4.0, 2) == {"guidance_scale": 4.0}


def test_a_given_size_turns_resolution_binning_off():
    from diffusers import HunyuanDiTPipeline, Lumina2Pipeline, SanaPipeline

    assert size_options(SanaPipeline, 32) == {"height": 32, "width": 32, "use_resolution_binning": False}
    assert size_options(HunyuanDiTPipeline, 64)["use_resolution_binning"] is False
    assert size_options(Lumina2Pipeline, 64) == {"height": 64, "width": 64}  # it does not bin


def test_prepare_runs_what_the_family_example_runs():
    from tests.tiny_driven_pipelines import allegro_pipeline

    pipe = allegro_pipeline()
    assert not pipe.vae.use_tiling
    prepare(pipe)
    assert pipe.vae.use_tiling


def test_missing_optional_packages_are_named():
    with pytest.raises(NameError) as caught:
        exec("ftfy.fix_text('x')", {})
    assert missing_package(caught.value) == "pip install ftfy"
    assert missing_package(NameError("x", name="OmniGenMultiModalProcessor")) == "pip install torchvision"
    assert "'Other'" in missing_package(NameError("x", name="Other"))
