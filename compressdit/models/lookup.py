"""Which adapter serves a model: the registered family adapters first, the generic one for any other diffusers
transformer with ``nn.Linear`` layers."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from compressdit.errors import UnsupportedModelError
from compressdit.models.base import ADAPTERS, ModelAdapter
from compressdit.models.driven import DrivenAdapter
from compressdit.models.generic import GenericAdapter


def registered_adapter(model: nn.Module) -> ModelAdapter | None:
    """The family adapter registered for ``model``'s class or a base class; ``None`` for any other model."""
    for cls in type(model).__mro__:
        for _, adapter in ADAPTERS.items():
            if adapter.model_class_name == cls.__name__:
                return adapter
    return None


def adapter_for(model: nn.Module, pipeline: Path | None = None) -> ModelAdapter:
    """The adapter registered for ``model``'s class (checked by class name, then by base classes); any other
    diffusers model with ``nn.Linear`` layers gets a :class:`~compressdit.models.generic.GenericAdapter`, or, when
    it came from the pipeline folder ``pipeline``, a :class:`~compressdit.models.driven.DrivenAdapter` that samples
    through that pipeline."""
    adapter = registered_adapter(model)
    if adapter is not None:
        return adapter
    try:
        if pipeline is not None and (Path(pipeline) / "model_index.json").exists():
            return DrivenAdapter(model, pipeline)
        return GenericAdapter(model)
    except UnsupportedModelError as exc:
        supported = ", ".join(sorted(a.model_class_name for _, a in ADAPTERS.items()))
        raise UnsupportedModelError(f"unsupported model class {type(model).__name__}: {exc}; supported: {supported}, "
                                    "and any diffusers transformer with nn.Linear layers") from None
