"""Per-family model adapters: the only place that knows a diffusers model class."""

from compressdit.models.base import ADAPTERS, ModelAdapter, adapter_for
import importlib as _importlib

for _family in ("dit", "pixart", "sd3", "flux", "cogvideox", "wan", "latte"):  # registers the adapters
    try:
        _importlib.import_module(f"compressdit.models.{_family}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"compressdit.models.{_family}":
            raise

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
