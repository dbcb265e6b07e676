"""Tests for compressdit.evaluate.metrics and compressdit.evaluate.features."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from compressdit.evaluate import features, metrics

torch.set_num_threads(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 32, 32, generator=_gen(seed)) * 2 - 1


def test_frechet_distance_identical_sets_is_zero() -> None:
    x = torch.randn(500, 8, generator=_gen(0))
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_equals_squared_mean_shift_for_identity_covariances() -> None:
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0])
    a = torch.randn(40000, 4, generator=_gen(1))
    b = torch.randn(40000, 4, generator=_gen(2)) + shift
    expected = float((shift**2).sum())  # 5.25; the covariance term vanishes for I vs I
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=0.01)


def test_frechet_distance_matches_scipy_sqrtm_formula() -> None:
    a = torch.randn(300, 6, generator=_gen(3)) @ torch.randn(6, 6, generator=_gen(4))
    b = torch.randn(200, 6, generator=_gen(5)) * 2 + 1
    an, bn = a.double().numpy(), b.double().numpy()
    ca, cb = np.cov(an, rowvar=False), np.cov(bn, rowvar=False)
    cross = scipy.linalg.sqrtm(ca @ cb).real
    ref = ((an.mean(0) - bn.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * cross)
    assert metrics.frechet_distance(a, b) == pytest.approx(float(ref), rel=1e-6)


def test_frechet_distance_rejects_too_few_samples_and_mismatched_dims() -> None:
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.frechet_distance(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="dimensions differ"):
        metrics.frechet_distance(torch.randn(5, 3), torch.randn(5, 4))


def test_psnr_identical_is_capped_and_known_value() -> None:
    x = _images()
    assert metrics.psnr(x, x) == 100.0
    # constant error 0.2 -> mse 0.04 -> 10 log10(4 / 0.04) = 20 dB
    assert metrics.psnr(x, x + 0.2) == pytest.approx(20.0, abs=1e-5)  # float32 input


def test_ssim_identical_is_one_and_decreases_with_noise() -> None:
    x = _images(seed=1)
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    noisy = [metrics.ssim(x, x + s * torch.randn(x.shape, generator=_gen(9))) for s in (0.05, 0.2, 0.5)]
    assert 1.0 > noisy[0] > noisy[1] > noisy[2]


def test_ssim_works_on_small_images_and_rejects_tiny_ones() -> None:
    x = torch.rand(2, 3, 7, 9, generator=_gen(2))
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least 7x7"):
        metrics.ssim(torch.zeros(1, 1, 6, 6), torch.zeros(1, 1, 6, 6))


def test_relative_error_and_sqnr_known_values() -> None:
    r = torch.tensor([3.0, 4.0])
    c = torch.tensor([3.0, 4.5])
    assert metrics.relative_error(c, r) == pytest.approx(0.5 / 5.0)
    assert metrics.sqnr_db(r, c) == pytest.approx(10 * math.log10(25.0 / 0.25))  # 20 dB
    assert metrics.sqnr_db(r, r.clone()) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.sqnr_db(r, torch.zeros(3))


def test_class_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
    assert metrics.class_accuracy(logits, torch.tensor([0, 1, 1, 1])) == 0.75
    with pytest.raises(ValueError):
        metrics.class_accuracy(logits, torch.tensor([0, 1]))


class _Embedder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(32 * 32, 5)
        self.drop = nn.Dropout(0.5)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(images.flatten(1)))


def test_classifier_features_eval_mode_batches_and_restores_training_flag() -> None:
    model = _Embedder().train()
    extractor = features.ClassifierFeatures(model, batch_size=3)
    x = _images(7)
    out = extractor(x)
    assert isinstance(extractor, features.FeatureExtractor)
    assert out.shape == (7, 5) and model.training
    assert torch.allclose(out, extractor(x))  # dropout off during extraction
    with pytest.raises(TypeError, match="embed"):
        features.ClassifierFeatures(nn.Linear(2, 2))


def test_effnet_lite0_loads_every_key_of_the_shipped_weights() -> None:
    model = features.load_effnet_lite0()
    state = torch.load(features.effnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    own = model.state_dict()
    assert set(own) == set(state)
    assert all(torch.equal(own[k], state[k]) for k in state)
    assert not model.training


def test_effnet_features_shape_and_determinism() -> None:
    extractor = features.EffNetLite0Features(size=64, batch_size=3)
    assert isinstance(extractor, features.FeatureExtractor)
    x = _images(5, seed=3)
    first, second = extractor(x), extractor(x)
    assert first.shape == (5, features.EFFNET_FEATURE_DIM) and first.dtype == torch.float32
    assert torch.equal(first, second)
    assert torch.allclose(extractor(x[:2]), first[:2], atol=1e-5)  # batching does not matter
    assert not torch.allclose(first[0], first[1])  # different images, different features


def test_effnet_preprocess_maps_range_to_tflite_normalisation() -> None:
    extractor = features.EffNetLite0Features(size=40)
    out = extractor.preprocess(torch.tensor([-1.0, 1.0]).view(2, 1, 1, 1).expand(2, 1, 32, 32))
    assert out.shape == (2, 3, 40, 40)
    assert torch.allclose(out[0], torch.full_like(out[0], -127 / 128))
    assert torch.allclose(out[1], torch.full_like(out[1], 128 / 128))
