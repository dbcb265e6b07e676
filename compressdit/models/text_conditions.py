"""Prompts -> token embeddings for text-conditioned adapters."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressdit.errors import UnsupportedModelError


@dataclass(frozen=True)
class TextEmbedding:
    """Precomputed token embeddings ``[seq, dim]`` with mask ``[seq]`` and optional pooled ``[pooled_dim]``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None


def synthetic_text(count: int, seq: int, dim: int, pooled_dim: int | None = None, seed: int = 0) -> list[TextEmbedding]:
    """Seeded random embeddings for random-weight architectures (speed/memory benchmarks, tests only)."""
    gen = torch.Generator().manual_seed(seed)
    return [TextEmbedding(torch.randn(seq, dim, generator=gen), torch.ones(seq, dtype=torch.long),
                          torch.randn(pooled_dim, generator=gen) if pooled_dim else None) for _ in range(count)]


def embed_prompts(conditions: list, dim: int, pooled_dim: int | None = None) -> list[TextEmbedding]:
    """Prompts become MiniLM token embeddings (384-d); ``TextEmbedding`` items pass through unchanged."""
    prompts = [c for c in conditions if isinstance(c, str)]
    encoded: dict[str, TextEmbedding] = {}
    if prompts:
        from compressdit.zoo.text import EMBED_DIM, encode_prompts

        if dim != EMBED_DIM or (pooled_dim not in (None, EMBED_DIM)):
            raise UnsupportedModelError(
                f"prompts need a text encoder of width {dim}; compressdit ships MiniLM ({EMBED_DIM}-d) only. "
                "Pass precomputed embeddings (TextEmbedding) from the model's own text encoder instead")
        unique = sorted(set(prompts))
        tokens, mask = encode_prompts(unique)
        for i, prompt in enumerate(unique):
            pooled = None
            if pooled_dim:
                pooled = (tokens[i] * mask[i, :, None]).sum(0) / mask[i].sum().clamp_min(1)
            encoded[prompt] = TextEmbedding(tokens[i], mask[i], pooled)
    return [encoded[c] if isinstance(c, str) else c for c in conditions]


def stack(embeddings: list[TextEmbedding]) -> dict[str, torch.Tensor]:
    out = {"tokens": torch.stack([e.tokens for e in embeddings]), "mask": torch.stack([e.mask for e in embeddings])}
    if embeddings and embeddings[0].pooled is not None:
        out["pooled"] = torch.stack([e.pooled for e in embeddings])
    return out
