"""Training data for distillation: real latents + labels, and the conditions each label stands for.

A class model's conditions are its class ids; a text model's are the zoo's training captions, several per
class. ``adapter.encode`` turns the whole condition vocabulary (plus the null condition) into model inputs
once; each step then picks rows of that table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compressdit.errors import ConfigError
from compressdit.models.base import Conditioning, ModelAdapter
from compressdit.registry import Registry
from compressdit.zoo.captions import training_captions
from compressdit.zoo.data import CLASS_NAMES
from compressdit.zoo.train_dits import encode_latents


@dataclass
class DistillData:
    """Scaled VAE latents ``[N, C, H, W]`` with class ``labels [N]``.

    ``conditions`` is the condition vocabulary (class ids, prompts or ``TextEmbedding``s) and
    ``condition_labels`` the class each one describes; a sample of class ``c`` gets one of the conditions of
    class ``c`` at random. ``null_condition`` replaces dropped conditions (guidance-free training). ``note``
    says where the latents came from and what they cost (for the report).
    """

    latents: torch.Tensor
    labels: torch.Tensor
    conditions: list[Any]
    condition_labels: list[int]
    null_condition: Any
    note: str = ""

    def __post_init__(self) -> None:
        if len(self.latents) != len(self.labels) or not len(self.latents):
            raise ConfigError(f"distillation data needs as many labels as latents (>= 1), got "
                              f"{len(self.labels)} labels for {len(self.latents)} latents")
        if len(self.conditions) != len(self.condition_labels):
            raise ConfigError(f"{len(self.conditions)} conditions but {len(self.condition_labels)} condition labels")
        missing = sorted(set(self.labels.unique().tolist()) - set(self.condition_labels))
        if missing:
            raise ConfigError(f"class {missing[0]} of the latents has no condition in the vocabulary")


def labelled_data(latents: torch.Tensor, conditions: list[Any], null_condition: Any, note: str = "") -> DistillData:
    """Latents with one condition each (class id, prompt or ``TextEmbedding``): equal ids / prompts share one
    vocabulary entry (their label); other conditions are entries of their own."""
    if len(conditions) != len(latents):
        raise ConfigError(f"{len(conditions)} conditions for {len(latents)} latents: need one per latent")
    vocabulary: list[Any] = []
    index: dict[Any, int] = {}
    labels = []
    for condition in conditions:
        key = condition if isinstance(condition, (int, str)) else ("object", id(condition))
        if key not in index:
            index[key] = len(vocabulary)
            vocabulary.append(condition)
        labels.append(index[key])
    return DistillData(latents, torch.tensor(labels, dtype=torch.long), vocabulary, list(range(len(vocabulary))),
                       null_condition, note)


@dataclass
class Batch:
    """One step's inputs: ``x_t``, per-sample ``timestep``, ``target`` and rows into the condition table."""

    x_t: torch.Tensor
    timestep: torch.Tensor
    target: torch.Tensor
    condition_rows: torch.Tensor

    def part(self, index: int, count: int) -> "Batch":
        """The ``index``-th of ``count`` equal slices (this process's share of the global batch)."""
        size = len(self.x_t) // count
        pick = slice(index * size, (index + 1) * size)
        return Batch(self.x_t[pick], self.timestep[pick], self.target[pick], self.condition_rows[pick])


class BatchSampler:
    """Draws global batches from ``data``: latents, conditions (with dropout), then noise by ``objective``."""

    def __init__(self, data: DistillData, objective, dropout: float) -> None:
        self.data, self.objective, self.dropout = data, objective, dropout
        by_class: dict[int, list[int]] = {}
        for row, label in enumerate(data.condition_labels):
            by_class.setdefault(int(label), []).append(row)
        classes = int(max(max(by_class), int(data.labels.max()))) + 1
        width = max(len(rows) for rows in by_class.values())
        self.rows = torch.zeros(classes, width, dtype=torch.long)
        self.counts = torch.zeros(classes, dtype=torch.long)
        for label, rows in by_class.items():
            self.rows[label, :len(rows)] = torch.tensor(rows)
            self.counts[label] = len(rows)
        self.null_row = len(data.conditions)

    def draw(self, batch_size: int, gen: torch.Generator) -> Batch:
        data = self.data
        idx = torch.randint(0, len(data.latents), (batch_size,), generator=gen)
        labels = data.labels[idx]
        pick = (torch.rand(batch_size, generator=gen) * self.counts[labels]).long()
        rows = self.rows[labels, pick]
        rows[torch.rand(batch_size, generator=gen) < self.dropout] = self.null_row
        x_t, timestep, target = self.objective.noisy(data.latents[idx].float(), gen)
        return Batch(x_t, timestep, target, rows)


def condition_table(adapter: ModelAdapter, model: nn.Module, data: DistillData) -> Conditioning:
    """Model inputs for every condition of the vocabulary, then the null condition (last row)."""
    return adapter.encode(model, list(data.conditions) + [data.null_condition])


def select(table: Conditioning, rows: torch.Tensor) -> Conditioning:
    return Conditioning({k: v[rows.to(v.device)] for k, v in table.tensors.items()})


# condition_kind -> (adapter) -> (conditions, condition labels, null condition)
Vocabulary = Callable[[ModelAdapter], tuple[list[Any], list[int], Any]]
VOCABULARIES: Registry[Vocabulary] = Registry("condition vocabulary")


def _class_vocabulary(adapter: ModelAdapter):
    ids = list(range(len(CLASS_NAMES)))
    return ids, ids, adapter.null_conditions(1)[0]


def _caption_vocabulary(adapter: ModelAdapter):
    captions, labels = training_captions()
    return captions, labels, adapter.null_conditions(1)[0]


VOCABULARIES.add("class", _class_vocabulary)
VOCABULARIES.add("text", _caption_vocabulary)


def fmnist_data(adapter: ModelAdapter, vae_dir: Path, cache_dir: Path, images: int | None = None) -> DistillData:
    """Fashion-MNIST training latents (the first ``images``, all when None) encoded by the VAE in ``vae_dir``
    as ``compressdit.zoo.train_dits.encode_latents`` does, cached in ``cache_dir`` per VAE and count."""
    weights = sorted(Path(vae_dir).glob("*.safetensors"))
    if not weights:
        raise ConfigError(f"no VAE weights in {vae_dir}: distillation encodes Fashion-MNIST with the model's VAE")
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16]
    cache = Path(cache_dir) / f"fmnist-latents-{digest}-{images or 'all'}.pt"
    latents, labels = encode_latents(Path(vae_dir), cache, limit=images)
    conditions, condition_labels, null = VOCABULARIES.get(adapter.condition_kind)(adapter)
    return DistillData(latents, labels, conditions, condition_labels, null,
                       f"{len(latents)} Fashion-MNIST training images encoded by the VAE in {vae_dir}")
