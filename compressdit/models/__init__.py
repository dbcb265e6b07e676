"""Per-family model adapters: the only place that knows a diffusers model class."""

import importlib as _importlib

from compressdit.models.base import ADAPTERS, ModelAdapter
from compressdit.models.lookup import adapter_for

for _family in ("dit", "pixart", "sd3", "flux", "cogvideox", "wan", "latte"):  # registers the adapters
    try:
        _importlib.import_module(f"compressdit.models.{_family}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"compressdit.models.{_family}":
            raise

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
