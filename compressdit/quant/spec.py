"""Per-module quantization spec: the manifest entry saved in ``quantization_config.modules``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.quant.primitives import MAX_BITS, MIN_BITS


@dataclass
class LinearQuantSpec(StrictConfig):
    """How one linear layer is quantized.

    YAML example::

        w_bits: 4
        a_bits: 8
        group_size: 64            # null = one scale per output channel
        w_symmetric: true
        a_granularity: per_token  # dynamic; or per_tensor (dynamic) / static (calibrated)
        balance: 0.5              # channel balancing, SmoothQuant alpha (null = off); needs calibration
        rotation: hadamard        # randomized block Hadamard on the input dim (or none)
    """

    format: str = "int"
    w_bits: int = 8
    a_bits: int | None = None
    group_size: int | None = None
    w_symmetric: bool = True
    a_granularity: Literal["per_token", "per_tensor", "static"] = "per_token"
    balance: float | None = None
    rotation: Literal["none", "hadamard"] = "none"

    def validate(self, where: str) -> None:
        from compressdit.quant.layers import FORMATS  # late: layers imports this module

        if self.format not in FORMATS:
            raise ConfigError(f"{where}.format: unknown format {self.format!r}; known: {', '.join(FORMATS)}")
        if not MIN_BITS <= self.w_bits <= MAX_BITS:
            raise ConfigError(f"{where}.w_bits: {self.w_bits} is out of range [{MIN_BITS}, {MAX_BITS}]")
        if self.a_bits is not None and not MIN_BITS <= self.a_bits <= MAX_BITS:
            raise ConfigError(f"{where}.a_bits: {self.a_bits} is out of range [{MIN_BITS}, {MAX_BITS}] (or null)")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"{where}.group_size: must be positive or null, got {self.group_size}")
        if self.balance is not None and not 0.0 <= self.balance <= 1.0:
            raise ConfigError(f"{where}.balance: migration strength must be in [0, 1] or null, got {self.balance}")
        if self.rotation != "none" and self.a_granularity == "static":
            raise ConfigError(f"{where}: a static activation scale cannot be calibrated through a rotation; "
                              "use a_granularity: per_token")

    @property
    def label(self) -> str:
        acts = f"A{self.a_bits}" if self.a_bits else "A16"
        group = f" g{self.group_size}" if self.group_size else ""
        extras = (" +balance" if self.balance is not None else "") + (" +hadamard" if self.rotation != "none" else "")
        return f"{self.format} W{self.w_bits}{acts}{group}{extras}"
