"""The registry of distillation data sources and what a source's loader receives.

Each source registers a strict config and a loader in :data:`DATA_SOURCES` (``fmnist`` and ``auto`` in
:mod:`compressdit.distill.sources`, ``teacher`` and ``images`` in their own modules); :mod:`compressdit.distill.sources`
parses the ``data`` key and dispatches to them. This module sits below all of them, so they import it one way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.models.base import ModelAdapter
from compressdit.registry import Registry

if TYPE_CHECKING:
    from compressdit.models.prompt_encoders import PromptEncoder


@dataclass
class DataContext:
    """What a source may need; the teacher and the VAE are loaded only by the sources that read them.

    ``model``: the model being compressed (its config gives the latent shape); ``teacher_folder``: the
    uncompressed transformer's folder (its weight files key the teacher cache); ``load_teacher``: returns the
    uncompressed transformer; ``pipeline_vae``: the pipeline's ``vae/`` folder, if any; ``scheduler``: the
    sampling scheduler; ``is_zoo``: the teacher is one of the zoo's reference models; ``prompt_encoder``: the
    model's own text encoder (None: prompts reach the adapter as strings, the zoo's MiniLM models).
    """

    adapter: ModelAdapter
    model: nn.Module
    teacher_folder: Path
    load_teacher: Callable[[], nn.Module]
    pipeline_vae: Path | None
    scheduler: Any
    cache_dir: Path
    is_zoo: bool = False
    quiet: bool = False
    prompt_encoder: PromptEncoder | None = None


@dataclass(frozen=True)
class DataSource:
    """A registered source: its strict config, the loader, and the key a ``NAME:ARG`` string sets."""

    config_class: type[StrictConfig]
    load: Callable[[Any, DataContext], Any]  # (config, context) -> DistillData
    argument: str | None = None


DATA_SOURCES: Registry[DataSource] = Registry("distillation data source")


def files_digest(folder: Path, patterns: tuple[str, ...] = ("*.safetensors", "*.bin", "config.json")) -> str:
    """SHA-1 (16 hex digits) of the files of ``folder`` matching ``patterns``: a model's identity on disk."""
    digest = hashlib.sha1()
    paths = sorted({p for pattern in patterns for p in Path(folder).glob(pattern)})
    if not paths:
        raise ConfigError(f"no weights in {folder}: cannot key the training-data cache")
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()[:16]
