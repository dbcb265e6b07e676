"""Run a benchmark as on a lesser CPU than this one: its code paths on this CPU's cores and caches.

``avx2``: torch's kernels, oneDNN, MKL and compressdit's C passes on AVX2 + FMA, no bf16 GEMMs
(``cpu_dense._bf16_hardware`` follows torch's capability) and no AMX microkernels: an AVX2-only x86 CPU's code paths
(not its speed: ratios within the run are what it gives). The environment must be set before torch starts, so the
benchmark runs itself again in it (:func:`emulate`).

Timings only: on the Zen 4 EPYC (AVX512-VNNI) oneDNN's int8 GEMMs capped at AVX2 give wrong sums (``torch._int_mm`` of
2 x 256 by 256 x 96 int8 off by ~5e4, oneDNN's prepacked u8s8 linear too; ``ONEDNN_MAX_CPU_ISA=AVX2`` alone does it,
``ATEN_CPU_CAPABILITY=avx2`` alone does not), so ``cpu-int8-gemm``'s outputs there are not its outputs on an AVX2 CPU
(where the W8A8 tests pass, the int16 saturation corner included); compressdit's own C passes and GEMMs are exact
under it (``tests/quant/test_quant_cpu_kernels.py`` passes in this environment).
"""

from __future__ import annotations

import os
import sys

EMULATIONS = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                       "COMPRESSDIT_CPU_MICROKERNELS": "0"}}


def emulate(name: str | None) -> None:
    """Re-run this process (same interpreter and arguments) under ``EMULATIONS[name]``, unless already under it; no-op
    for ``None``."""
    if name and os.environ.get("COMPRESSDIT_EMULATING") != name:
        environment = {**os.environ, **EMULATIONS[name], "COMPRESSDIT_EMULATING": name}
        os.execve(sys.executable, [sys.executable, *sys.argv], environment)


def emulation_note(name: str | None, capability: str) -> str:
    """The markdown clause a result's header carries for an emulated run ("" for none)."""
    if not name:
        return ""
    settings = " ".join(f"{k}={v}" for k, v in EMULATIONS[name].items())
    return f", **emulating an {name} CPU** (`--emulate {name}`: {settings}; torch's capability {capability})"
