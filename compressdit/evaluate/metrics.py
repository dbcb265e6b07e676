"""Pure metric functions on torch tensors; every function returns a plain Python float.

Images are expected in ``[-1, 1]`` with shape ``[N, C, H, W]`` (hence ``data_range=2.0``).
All reductions run in float64 so that results do not depend on the input dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_PSNR_CAP_DB = 100.0
_SSIM_K1, _SSIM_K2, _SSIM_SIGMA = 0.01, 0.03, 1.5


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        raise ValueError(f"{what}: inputs are empty")


def _images(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    _same_shape(a, b, what)
    if a.dim() != 4:
        raise ValueError(f"{what}: expected images shaped [N, C, H, W], got {tuple(a.shape)}")
    return a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) clip to 0."""
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N, D]`` and ``[M, D]``.

    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))``. The trace of the cross term is
    computed as ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))``: that matrix is symmetric PSD, so
    its eigenvalues are real and the imaginary round-off of a general ``sqrtm`` cannot occur.
    """
    if feats_a.dim() != 2 or feats_b.dim() != 2:
        raise ValueError(
            f"frechet_distance: expected 2-D feature matrices [N, D], got shapes "
            f"{tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(
            f"frechet_distance: feature dimensions differ ({feats_a.shape[1]} vs {feats_b.shape[1]})"
        )
    if feats_a.shape[0] < 2 or feats_b.shape[0] < 2:
        raise ValueError(
            f"frechet_distance: need at least 2 samples per set to estimate a covariance, "
            f"got {feats_a.shape[0]} and {feats_b.shape[0]}"
        )
    a = feats_a.detach().to("cpu", torch.float64).numpy()
    b = feats_b.detach().to("cpu", torch.float64).numpy()
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    cross = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    mean_term = float(((mu_a - mu_b) ** 2).sum())
    value = mean_term + float(np.trace(cov_a) + np.trace(cov_b)) - 2.0 * trace_cross
    return max(value, 0.0)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean over the batch of per-image PSNR in dB; identical images count as 100 dB."""
    x, y = _images(a, b, "psnr")
    mse = ((x - y) ** 2).flatten(1).mean(dim=1)
    per_image = 10.0 * torch.log10(data_range**2 / mse)  # inf where mse == 0
    return float(per_image.clamp(max=_PSNR_CAP_DB).mean())


def _gaussian_window(size: int, sigma: float, channels: int) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g).expand(channels, 1, size, size).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Mean structural similarity (Wang et al. 2004) over the batch.

    Gaussian window with sigma 1.5, size 11 (or 7 for images smaller than 11 pixels; at
    least 7 is required), ``K1=0.01, K2=0.03``, computed per channel on the 'valid' region.
    """
    x, y = _images(a, b, "ssim")
    height, width = x.shape[-2:]
    if min(height, width) < 7:
        raise ValueError(f"ssim: images must be at least 7x7 pixels, got {height}x{width}")
    size = 11 if min(height, width) >= 11 else 7
    channels = x.shape[1]
    window = _gaussian_window(size, _SSIM_SIGMA, channels)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)

    c1, c2 = (_SSIM_K1 * data_range) ** 2, (_SSIM_K2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    num = (2.0 * mu_x * mu_y + c1) * (2.0 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return float((num / den).flatten(1).mean(dim=1).mean())


def relative_error(candidate: torch.Tensor, reference: torch.Tensor, eps: float = 1e-12) -> float:
    """``||candidate - reference|| / (||reference|| + eps)`` with Frobenius norms."""
    _same_shape(candidate, reference, "relative_error")
    c = candidate.detach().to("cpu", torch.float64)
    r = reference.detach().to("cpu", torch.float64)
    return float(torch.linalg.vector_norm(c - r) / (torch.linalg.vector_norm(r) + eps))


def sqnr_db(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio ``10 log10(sum r^2 / sum (r - c)^2)`` in dB.

    Returns ``inf`` when the tensors are identical and ``-inf`` for a zero reference with
    non-zero noise.
    """
    _same_shape(reference, candidate, "sqnr_db")
    r = reference.detach().to("cpu", torch.float64)
    c = candidate.detach().to("cpu", torch.float64)
    signal = float((r**2).sum())
    noise = float(((r - c) ** 2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows of ``logits [N, K]`` whose argmax equals ``labels [N]``."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"class_accuracy: expected logits [N, K] and labels [N], got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.numel() == 0:
        raise ValueError("class_accuracy: no samples")
    predicted = logits.detach().argmax(dim=1).cpu()
    return float((predicted == labels.detach().cpu().long()).double().mean())
