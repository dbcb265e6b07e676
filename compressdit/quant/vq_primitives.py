"""Vector-quantization primitives: sub-vectors, deterministic k-means, nearest codewords, code packing.

Layout shared with the CUDA kernels (``cuda_ext/``): a weight ``[out, in]`` is cut into sub-vectors
of ``d`` consecutive input weights per row; row ``r`` stores its ``in / d`` codes as one little-endian
bit stream: code ``j`` occupies stream bits ``[j * b, (j + 1) * b)`` and stream bit ``i`` is bit
``i % 8`` of byte ``i // 8``. With ``b = 8`` this is one ``uint8`` per code.
"""

from __future__ import annotations

import torch


def packed_code_bytes(count: int, bits: int) -> int:
    """Bytes one row of ``count`` codes of ``bits`` bits needs (the stream must end on a byte)."""
    if (count * bits) % 8:
        raise ValueError(f"{count} codes of {bits} bits do not fill whole bytes")
    return count * bits // 8


def pack_code_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[rows, count]`` (each < 2**bits) into ``uint8 [rows, count * bits / 8]``."""
    rows, count = codes.shape
    nbytes = packed_code_bytes(count, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    shifts = torch.arange(bits, device=codes.device)
    stream = ((codes.long().unsqueeze(-1) >> shifts) & 1).reshape(rows, nbytes, 8)
    return (stream << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)


def unpack_code_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_code_bits`: ``int64 [rows, count]``."""
    if bits == 8:
        return packed.long()[:, :count]
    rows = packed.shape[0]
    stream = (packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1
    stream = stream.reshape(rows, -1)[:, : count * bits].reshape(rows, count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(-1)


def to_subvectors(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``[out, in]`` -> ``[out * in / dim, dim]`` (row-major: consecutive input weights of one row)."""
    out_features, in_features = weight.shape
    if in_features % dim:
        raise ValueError(f"in_features {in_features} is not divisible by the vector dimension {dim}")
    return weight.reshape(out_features * in_features // dim, dim)


def pairwise_sq_distances(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[N, k]`` (clamped at 0 against cancellation)."""
    return ((vectors * vectors).sum(1, keepdim=True) - 2 * vectors @ codebook.T
            + (codebook * codebook).sum(1)).clamp_min(0)


def nearest_codewords(vectors: torch.Tensor, codebook: torch.Tensor, n: int = 1,
                      chunk: int = 1 << 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and squared distances of the ``n`` nearest codewords of every vector (chunked)."""
    indices, distances = [], []
    for start in range(0, vectors.shape[0], chunk):
        dist = pairwise_sq_distances(vectors[start:start + chunk], codebook)
        d, i = torch.topk(dist, n, dim=1, largest=False)
        indices.append(i)
        distances.append(d)
    return torch.cat(indices), torch.cat(distances)


def _kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling), deterministic for a given generator state."""
    first = torch.randint(points.shape[0], (1,), generator=generator, device=points.device)
    centers = [points[first]]
    closest = pairwise_sq_distances(points, centers[0]).squeeze(1)
    for _ in range(1, k):
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        pick = torch.multinomial(weights, 1, generator=generator)
        centers.append(points[pick])
        closest = torch.minimum(closest, pairwise_sq_distances(points, centers[-1]).squeeze(1))
    return torch.cat(centers)


def kmeans(vectors: torch.Tensor, k: int, iterations: int = 100, seed: int = 0, sample_size: int = 1 << 16,
           tolerance: float = 1e-6) -> torch.Tensor:
    """Deterministic k-means codebook ``[k, d]`` (fp32) for ``vectors [N, d]``.

    k-means++ seeding on a sample, then Lloyd iterations on a fixed random sample of at most
    ``sample_size`` vectors (all of them when fewer) until the relative change of the objective
    falls below ``tolerance``; empty clusters are re-seeded from the worst-fit points.
    """
    points = vectors.detach().float()
    if k > points.shape[0]:
        raise ValueError(f"k={k} codewords need at least {k} vectors, got {points.shape[0]}")
    generator = torch.Generator(device=points.device).manual_seed(seed)
    if points.shape[0] > sample_size:
        points = points[torch.randperm(points.shape[0], generator=generator, device=points.device)[:sample_size]]
    seed_points = points[: min(points.shape[0], max(16 * k, 4096))]
    codebook = _kmeans_plus_plus(seed_points, k, generator)
    previous = float("inf")
    for _ in range(iterations):
        assign, dist = nearest_codewords(points, codebook)
        assign, dist = assign.squeeze(1), dist.squeeze(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(codebook).index_add_(0, assign, points)
        empty = counts == 0
        codebook = torch.where(empty.unsqueeze(1), codebook, sums / counts.clamp_min(1).unsqueeze(1).float())
        if empty.any():
            worst = torch.topk(dist, int(empty.sum()), largest=True).indices
            codebook[empty] = points[worst]
        objective = float(dist.mean())
        if not empty.any() and previous - objective <= tolerance * max(previous, 1e-30):
            break
        previous = objective
    return codebook
