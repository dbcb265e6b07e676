"""``ModelAdapter.synthetic_conditioning``: seeded inputs of the model's shapes without a text encoder."""

from __future__ import annotations

import pytest
import torch

from compressdit.models import ADAPTERS
from tests.models.test_adapters import POOLED_DIM, TEXT_DIM, _model


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_synthetic_conditioning_has_the_models_shapes_and_is_seeded(family: str) -> None:
    adapter, model = ADAPTERS.get(family), _model(family)
    cond = adapter.synthetic_conditioning(model, 3, seed=1)
    assert len(cond) == 3
    if family == "dit":
        labels = cond.tensors["class_labels"]
        assert labels.dtype == torch.long and ((labels >= 0) & (labels < 1000)).all()
    else:
        assert cond.tensors["encoder_hidden_states"].shape == (3, adapter.synthetic_tokens, TEXT_DIM)
        if family in ("sd3", "flux"):
            assert cond.tensors["pooled_projections"].shape == (3, POOLED_DIM)
    again, other = adapter.synthetic_conditioning(model, 3, seed=1), adapter.synthetic_conditioning(model, 3, seed=2)
    assert all(torch.equal(v, again.tensors[k]) for k, v in cond.tensors.items())
    assert any(not torch.equal(v, other.tensors[k]) for k, v in cond.tensors.items())
    latents = torch.randn(3, *adapter.latent_shape(model), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = adapter.predict(model, latents, torch.tensor([500]), cond)
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_synthetic_class_labels_stay_below_the_models_class_count() -> None:
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, num_layers=1,
                                  sample_size=4, patch_size=2, num_embeds_ada_norm=10)
    labels = ADAPTERS.get("dit").synthetic_conditioning(model, 64, seed=0).tensors["class_labels"]
    assert labels.max() < 10 and len(labels.unique()) > 1
