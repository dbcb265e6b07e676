"""Per-family model adapters: the only place that knows a diffusers model class."""

from compressdit.models.base import ADAPTERS, ModelAdapter
from compressdit.models.lookup import adapter_for
from compressdit.models import dit, pixart, sd3, flux, cogvideox, wan, latte  # noqa: F401  (register the adapters)

__all__ = ["ADAPTERS", "ModelAdapter", "adapter_for"]
