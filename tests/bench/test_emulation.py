"""bench/emulation.py: a benchmark re-run as on an AVX2-only CPU gets that CPU's code paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_avx2_emulation_reruns_the_process_without_avx512_or_bf16_gemms(tmp_path):
    """``emulate("avx2")`` starts the script again under the emulation's environment (set before torch loads): torch
    runs its AVX2 kernels (or less, on a lesser CPU), and compressdit sees no bf16 GEMM hardware and no AMX microkernel,
    so the kernels an AVX2-only CPU would pick are the ones timed; the re-run says which emulation it is under."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import os, sys\nsys.path.insert(0, {str(BENCH)!r})\nfrom emulation import emulate\nemulate('avx2')\n"
        "import torch\nfrom compressdit.quant.cpu_dense import bf16_hardware\n"
        "from compressdit.quant.cpu_native import bf16_brgemm, int8_brgemm\n"
        "print(torch.backends.cpu.get_cpu_capability(), bf16_hardware(), bf16_brgemm(), int8_brgemm(),"
        " os.environ['COMPRESSDIT_EMULATING'])\n")
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] in ("AVX2", "DEFAULT", "NO AVX") and out[1:] == ["False", "False", "False", "avx2"]
