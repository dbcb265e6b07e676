"""Prompts -> token embeddings for text-conditioned adapters.

A model with its own text encoder gets its prompts as ``TextEmbedding``s from a prompt encoder
(:mod:`compressdit.models.prompt_encoders`), which pass through :func:`embed_prompts` unchanged. Prompts that
reach an adapter as strings are embedded by MiniLM, the text encoder of compressdit's reference models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressdit.errors import UnsupportedModelError
from compressdit.zoo.text import EMBED_DIM, encode_prompts

ENCODER_HINT = "pass --text-encoder PIPELINE_OR_FOLDER (a pipeline with the model's text encoders) or --embeddings FILE"


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


def minilm_embeddings(prompts: list[str], pooled: bool) -> list[TextEmbedding]:
    """MiniLM token embeddings (384-d, masked) of ``prompts`` in one batch; ``pooled``: add their masked mean."""
    tokens, mask = encode_prompts(prompts)
    return [TextEmbedding(tokens[i], mask[i],
                          (tokens[i] * mask[i, :, None]).sum(0) / mask[i].sum().clamp_min(1) if pooled else None)
            for i in range(len(prompts))]


def _check_width(embedding: TextEmbedding, dim: int, pooled_dim: int | None) -> None:
    width = embedding.tokens.shape[-1]
    pooled = embedding.pooled.shape[-1] if embedding.pooled is not None and pooled_dim else pooled_dim
    if width != dim or pooled != pooled_dim:
        got = f"{width}-d tokens" + (f" and {pooled}-d pooled vectors" if pooled_dim else "")
        want = f"{dim}-d tokens" + (f" and {pooled_dim}-d pooled vectors" if pooled_dim else "")
        raise UnsupportedModelError(f"text embeddings have {got} but the model takes {want}: {ENCODER_HINT} "
                                    "matching the model")


def embed_prompts(conditions: list, dim: int, pooled_dim: int | None = None) -> list[TextEmbedding]:
    """Prompts become MiniLM token embeddings (384-d); ``TextEmbedding`` items pass through (widths checked)."""
    prompts = [c for c in conditions if isinstance(c, str)]
    encoded: dict[str, TextEmbedding] = {}
    if prompts:
        if dim != EMBED_DIM or (pooled_dim not in (None, EMBED_DIM)):
            raise UnsupportedModelError(
                f"prompts need a text encoder of width {dim} and this model brings none (compressdit's MiniLM, "
                f"for its reference models, is {EMBED_DIM}-d): {ENCODER_HINT}")
        unique = sorted(set(prompts))
        encoded = dict(zip(unique, minilm_embeddings(unique, pooled=bool(pooled_dim))))
    for c in conditions:
        if isinstance(c, TextEmbedding) and dim is not None:
            _check_width(c, dim, pooled_dim)
    return [encoded[c] if isinstance(c, str) else c for c in conditions]


def stack(embeddings: list[TextEmbedding]) -> dict[str, torch.Tensor]:
    out = {"tokens": torch.stack([e.tokens for e in embeddings]), "mask": torch.stack([e.mask for e in embeddings])}
    if embeddings and embeddings[0].pooled is not None:
        out["pooled"] = torch.stack([e.pooled for e in embeddings])
    return out
