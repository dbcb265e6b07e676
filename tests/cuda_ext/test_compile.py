"""The CUDA sources build without a GPU: kernels with nvcc, the torch binding parsed by the host compiler.

The binding check is ``g++ -fsyntax-only`` against torch's headers, the python headers and the CUDA include
dir. CPU wheels of torch ship the ``c10/cuda`` headers but not the generated
``c10/cuda/impl/cuda_cmake_macros.h``, so the check defines ``C10_CUDA_NO_CMAKE_CONFIGURE_FILE`` (that file only
sets export macros). torch >= 2.10 headers need C++20 (what ``torch.utils.cpp_extension`` passes); the
kernels themselves are checked as C++17. Linking the extension needs a CUDA torch and is left to GPU machines.
Both compilers run in parallel (about 30 s on 2 cores).
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

from compressdit.quant.vq_primitives import pack_code_bits

SOURCES = Path(__file__).resolve().parents[2] / "cuda_ext"
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")


def cuda_include_dir() -> Path | None:
    """``include/`` of the toolkit that holds ``cuda_runtime_api.h`` (next to nvcc), if any."""
    if NVCC is None:
        return None
    for root in (Path(NVCC).resolve().parents[1], Path("/usr/local/cuda")):
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root / "include"
    return None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Start nvcc (kernels -> object) and g++ (binding, syntax only) at once; tests wait on their own."""
    out = tmp_path_factory.mktemp("cuda_ext")
    started = {}
    if NVCC:
        started["kernels"] = subprocess.Popen(
            [NVCC, "-c", "-std=c++17", "-arch=sm_80", str(SOURCES / "vq_kernels.cu"), "-o", str(out / "vq_kernels.o")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    include = cuda_include_dir()
    if GXX and include is not None:
        from torch.utils.cpp_extension import include_paths

        flags = [f"-I{path}" for path in [*include_paths(), sysconfig.get_paths()["include"], include, SOURCES]]
        started["binding"] = subprocess.Popen(
            [GXX, "-fsyntax-only", "-std=c++20", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
             "-DTORCH_EXTENSION_NAME=vq_syntax_check", *flags, str(SOURCES / "vq_binding.cpp")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield out, started
    for process in started.values():
        process.kill()


def finished(builds, name: str) -> str:
    process = builds[1][name]
    log, _ = process.communicate(timeout=300)
    assert process.returncode == 0, f"{name} did not compile:\n{log}"
    return log


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_kernels_compile_standalone_with_nvcc(builds):
    finished(builds, "kernels")
    assert (builds[0] / "vq_kernels.o").stat().st_size > 0


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_kernel_code_extraction_matches_pack_code_bits(builds):
    """Link the object into a host program (no GPU needed) and read codes back with the kernels' extractor."""
    finished(builds, "kernels")
    program = builds[0] / "read_codes"
    main = builds[0] / "read_codes.cpp"
    main.write_text(
        '#include <cstdio>\n#include <vector>\n#include "vq_kernels.h"\n'
        "int main() {  // stdin: bits count nbytes bytes... -> codes\n"
        "  int bits; long count, nbytes; std::scanf(\"%d %ld %ld\", &bits, &count, &nbytes);\n"
        "  std::vector<uint8_t> row(nbytes); for (auto& b : row) { int v; std::scanf(\"%d\", &v); b = v; }\n"
        "  for (long j = 0; j < count; ++j) std::printf(\"%d \", compressdit::vq_code_at(row.data(), j, bits));\n}\n")
    subprocess.run([NVCC, "-std=c++17", f"-I{SOURCES}", str(main), str(builds[0] / "vq_kernels.o"), "-o",
                    str(program)], check=True, capture_output=True)
    generator = torch.Generator().manual_seed(0)
    count = 43  # for code_bits < 8 the row's last byte is partly padding: reads must stop inside the row
    for bits in range(1, 9):
        codes = torch.randint(0, 1 << bits, (1, count), generator=generator)
        packed = pack_code_bits(torch.nn.functional.pad(codes, (0, 5)), bits)[:, : (count * bits + 7) // 8]
        stdin = f"{bits} {count} {packed.shape[1]} " + " ".join(map(str, packed[0].tolist()))
        result = subprocess.run([str(program)], input=stdin, capture_output=True, text=True, check=True)
        assert list(map(int, result.stdout.split())) == codes[0].tolist(), f"code_bits={bits}"


@pytest.mark.skipif(GXX is None or cuda_include_dir() is None, reason="needs g++ and the CUDA toolkit headers")
def test_binding_parses_against_torch_headers(builds):
    finished(builds, "binding")
