"""Per-module quantization spec: the manifest entry saved in ``quantization_config.modules``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressdit.config_base import StrictConfig
from compressdit.errors import ConfigError
from compressdit.quant.activations import validate_activation_spec
from compressdit.quant.format_registry import FORMATS
from compressdit.quant.primitives import MAX_BITS, MIN_BITS


@dataclass
class LinearQuantSpec(StrictConfig):
    """How one linear layer is quantized.

    YAML example::

        w_bits: 4
        a_bits: 8
        group_size: 64            # null = one scale per output channel
        w_symmetric: true
        w_range: mse              # weight range per channel/group: minmax, or the MSE-optimal shrink
        rounding: gptq            # rtn, or GPTQ error compensation from calibration inputs (needs calibration)
                                  # (minifloat weights: rtn or adaround, block-output reconstruction)
        act_order: false          # gptq only: columns by decreasing input energy, group scales fitted up front
        a_granularity: per_token  # dynamic; or per_group / per_tensor (dynamic) / static (calibrated)
        a_format: int             # or a minifloat (e2m1, e4m3, ...), nvfp4, mxfp4, mxfp8 (quant/activations.py)
        a_group_size: null        # inputs per activation scale with a_granularity: per_group (16 / 32 / 64)
        balance: 0.5              # channel balancing, SmoothQuant alpha (null = off); needs calibration
        rotation: hadamard        # randomized block Hadamard on the input dim (or none; duquant: format twinlog)
        low_rank: 32              # SVDQuant: a rank-32 16-bit branch; only the residual is quantized (int)

    Vector quantization (``format: vq``, weight-only) stores per-layer codebooks of ``codebook_size``
    codewords of ``vector_dim`` weights; ``w_bits: 2`` / ``3`` default to the paper's d=4, k=256 /
    d=2, k=64 (log2(k) / d bits per weight). ``row_scale: true`` divides each output row by its RMS before
    k-means and stores that scale (fp16, one per row), so rows of different magnitude share one codebook.

    ``format: fp8`` stores E4M3 weights (``w_bits: 8``, one fp32 scale per output channel) and, with
    ``a_bits: 8``, quantizes activations to E4M3 per token (``torch._scaled_mm`` on GPUs that have it).
    """

    format: str = "int"
    w_bits: int = 8
    a_bits: int | None = None
    group_size: int | None = None
    w_symmetric: bool = True
    w_range: Literal["minmax", "mse"] = "minmax"
    rounding: Literal["rtn", "gptq", "adaround"] = "rtn"
    act_order: bool = False
    a_granularity: Literal["per_token", "per_group", "per_tensor", "static"] = "per_token"
    a_format: str = "int"
    a_group_size: int | None = None
    balance: float | None = None
    rotation: Literal["none", "hadamard", "duquant"] = "none"
    vector_dim: int | None = None
    codebook_size: int | None = None
    row_scale: bool = False
    low_rank: int | None = None

    def validate(self, where: str) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"{where}.format: unknown format {self.format!r}; known: {', '.join(FORMATS)}")
        FORMATS.get(self.format).validate_spec(self, where)
        validate_activation_spec(self, where)
        if self.rounding not in FORMATS.get(self.format).roundings:
            raise ConfigError(f"{where}.rounding: format {self.format!r} supports rounding "
                              f"{' / '.join(FORMATS.get(self.format).roundings)}, not {self.rounding!r}")
        if self.rotation not in FORMATS.get(self.format).rotations:
            raise ConfigError(f"{where}.rotation: format {self.format!r} supports rotation "
                              f"{' / '.join(FORMATS.get(self.format).rotations)}, not {self.rotation!r}")
        if self.act_order and self.rounding != "gptq":
            raise ConfigError(f"{where}.act_order: only applies to rounding: gptq")
        if not MIN_BITS <= self.w_bits <= MAX_BITS:
            raise ConfigError(f"{where}.w_bits: {self.w_bits} is out of range [{MIN_BITS}, {MAX_BITS}]")
        if self.a_bits is not None and not MIN_BITS <= self.a_bits <= MAX_BITS:
            raise ConfigError(f"{where}.a_bits: {self.a_bits} is out of range [{MIN_BITS}, {MAX_BITS}] (or null)")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"{where}.group_size: must be positive or null, got {self.group_size}")
        if self.low_rank is not None and self.low_rank <= 0:
            raise ConfigError(f"{where}.low_rank: the branch's rank must be positive or null, got {self.low_rank}")
        if self.balance is not None and not 0.0 <= self.balance <= 1.0:
            raise ConfigError(f"{where}.balance: migration strength must be in [0, 1] or null, got {self.balance}")
        if self.rotation != "none" and self.a_granularity == "static":
            raise ConfigError(f"{where}: a static activation scale cannot be calibrated through a rotation; "
                              "use a_granularity: per_token")

    @property
    def bits_per_weight(self) -> float:
        """Index/code bits per weight, without scales or codebooks."""
        if self.vector_dim:
            return (self.codebook_size - 1).bit_length() / self.vector_dim
        return float(self.w_bits)

    @property
    def label(self) -> str:
        if self.vector_dim:
            return (f"{self.format} W{self.w_bits} d{self.vector_dim} k{self.codebook_size}"
                    + (" +row-scale" if self.row_scale else ""))
        acts = f"A{self.a_bits}" if self.a_bits else "A16"
        acts += f"-{self.a_format}" if self.a_bits and self.a_format != "int" else ""
        acts += f" ag{self.a_group_size}" if self.a_bits and self.a_group_size else ""
        group = f" g{self.group_size}" if self.group_size else ""
        extras = "".join(name for name, used in ((" +mse-range", self.w_range == "mse"),
                                                  (" +balance", self.balance is not None),
                                                  (f" +{self.rounding}", self.rounding != "rtn"),
                                                  (" +act-order", self.act_order),
                                                  (f" +{self.rotation}", self.rotation != "none"),
                                                  (f" +lr{self.low_rank}", self.low_rank is not None)) if used)
        return f"{self.format} W{self.w_bits}{acts}{group}{extras}"


# spec fields a format may not implement, each with the test that the spec uses it (for reject_unused_fields)
SPEC_FIELDS_IN_USE = {
    "group_size": lambda s: s.group_size is not None,
    "w_symmetric: false": lambda s: not s.w_symmetric,
    "w_range: mse": lambda s: s.w_range != "minmax",
    "balance": lambda s: s.balance is not None,
    "rotation": lambda s: s.rotation != "none",
    "low_rank": lambda s: s.low_rank is not None,
    "vector_dim / codebook_size / row_scale": lambda s: (s.vector_dim is not None or s.codebook_size is not None
                                                          or bool(s.row_scale)),
    "a_granularity: static": lambda s: s.a_granularity == "static",
    "a_granularity other than per_token": lambda s: s.a_granularity != "per_token",
}


def reject_unused_fields(spec: LinearQuantSpec, where: str, fields: tuple[str, ...], takes: str,
                         hint: str = "") -> None:
    """One error naming every field of ``fields`` (keys of :data:`SPEC_FIELDS_IN_USE`) that ``spec`` sets but its
    format does not implement: ``{where}: format 'x' {takes}; unset a, b{hint}``."""
    used = [name for name in fields if SPEC_FIELDS_IN_USE[name](spec)]
    if used:
        raise ConfigError(f"{where}: format {spec.format!r} {takes}; unset {', '.join(used)}{hint}")
