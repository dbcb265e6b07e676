"""Building the CPU libraries of :mod:`compressdit.quant.cpu_native` and :mod:`compressdit.moe.cpu_native` on first
use: each source compiled on its own into an object file (in parallel, one compiler per core), then linked.

Objects and libraries are cached in ``$COMPRESSDIT_CACHE/native`` under digests of what went into them (an object's:
its compiler, flags, source and the local headers it includes; a library's: its objects' digests, link flags and
libraries), so a library that shares sources with another links the objects already built: the op library
(``cpu_ops``) reuses every C object of ``cpu_rows``. Builds from concurrent processes write temporary files and
rename them: the last rename wins, each file is whole; and they take turns (a lock file in the folder, where the
platform has ``fcntl``): a process that finds another building waits, then finds its objects built.

Why: one ``cc`` / ``c++`` command over all sources took 43 s for ``cpu_rows`` and 85 s for ``cpu_ops`` (which compiled
the same C sources again) on a 2-core EPYC; a process's first quantized forward waited for both.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from compressdit.cache import default_cache_dir

#: a compile of one source may take this long (C++ with torch's headers: ~20 s on a 2-core EPYC)
COMPILE_TIMEOUT_S = 300
_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def compile_flags(openmp: bool) -> list[str]:
    """No ``-march=native`` (a shared cache directory may serve other CPUs): the vector ISA torch itself uses
    here (AVX-512 divides 1.35x faster than AVX2 on the EPYC the benchmarks ran on). ``-fno-trapping-math``: GCC
    then if-converts the loops' clamps and selects (``t < 88 ? t : 88``) into vector blends for AVX2 too (with its
    default, only AVX-512's masked compares vectorize them: the tanh GELU ran scalar on AVX2, 3.2 ns an element against
    torch's 2.4); it gives up nothing but floating-point exception flags, which nothing here reads: the same numbers."""
    vector = {"AVX2": ["-mavx2", "-mfma"],
              "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]}
    vector = vector.get(torch.backends.cpu.get_cpu_capability(), [])
    return ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", *vector,
            *(["-fopenmp"] * openmp)]


def torch_op_flags() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """What a C++ source of a torch op library adds to :func:`compile_flags` (torch's headers, C++ ABI and version:
    part of its objects' digests), and what the library links against (torch's own libraries, found at run time where
    torch loaded them)."""
    from torch.utils import cpp_extension  # here: importing it loads setuptools, which only a build needs

    torch_lib = str(Path(torch.__file__).parent / "lib")
    flags = ("-std=c++17", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}",
             f'-DCOMPRESSDIT_TORCH="{torch.__version__}"', *(f"-I{p}" for p in cpp_extension.include_paths()))
    return flags, (f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-ltorch_cpu", "-lc10")


def openmp_runtimes() -> set[str]:
    """Files of the OpenMP runtimes mapped into this process (GNU, Intel, LLVM; Linux only, else none seen)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    return {line.split()[-1] for line in maps.splitlines()
            if re.search(r"/lib(gomp|iomp5|omp)[^/]*\.so", line.split()[-1])}


def torch_runs_libgomp() -> bool:
    """torch's intra-op threads are OpenMP ones of the one mapped ``libgomp.so.1``: the soname ``-fopenmp`` links,
    so a library built with it shares torch's runtime and thread pool (the loader reuses a loaded soname)."""
    runtimes = openmp_runtimes()
    return ("parallel backend: OpenMP" in torch.__config__.parallel_info() and len(runtimes) == 1
            and Path(next(iter(runtimes))).name.startswith("libgomp.so.1"))


def build_on_torch_threads(stem: str, sources: list[Path]) -> ctypes.CDLL | None:
    """:func:`build_library` of ``sources`` with :func:`compile_flags`: with OpenMP where :func:`torch_runs_libgomp`
    (the library's threads then torch's own runtime and pool), else, or where that build fails or loading it brought a
    second OpenMP runtime, without; the library's ``openmp`` attribute says which (``None``: no library)."""
    openmp = torch_runs_libgomp()
    lib = build_library(stem, sources, compile_flags(True)) if openmp else None
    if openmp and lib is None:  # said: every pass then runs on one thread, which no output shows
        warnings.warn(f"compressdit: the OpenMP build of its {stem} library failed; its CPU passes run on one "
                      "thread", RuntimeWarning, stacklevel=2)
    if lib is None or len(openmp_runtimes()) > 1:  # no OpenMP compiler, or a second runtime: one thread
        openmp, lib = False, build_library(stem, sources, compile_flags(False))
    if lib is not None:
        lib.openmp = openmp
    return lib


def compiler_for(source: Path) -> str | None:
    """The system compiler of ``source``'s language (``$CC`` / ``cc`` for ``.c``, ``$CXX`` / ``c++`` otherwise), or
    ``None`` where it is not installed."""
    return shutil.which(os.environ.get("CC", "cc") if source.suffix == ".c" else os.environ.get("CXX", "c++"))


def _local_headers(source: Path) -> list[Path]:
    """The ``#include "..."`` files ``source`` reads, and theirs, beside it (sorted: the digest's order)."""
    seen, todo = set(), [source]
    while todo:
        for name in _INCLUDE.findall(todo.pop().read_bytes()):
            header = source.parent / name.decode()
            if header.exists() and header not in seen:
                seen.add(header)
                todo.append(header)
    return sorted(seen)


def _digest(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]


def _write_atomically(target: Path, command_of) -> bool:
    """Run ``command_of(temporary path)`` and rename its output to ``target``; False where it failed."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        if subprocess.run(command_of(built), capture_output=True, timeout=COMPILE_TIMEOUT_S).returncode:
            return False
        os.replace(built, target)
    return True


def _object(source: Path, flags: list[str], folder: Path) -> tuple[Path, str] | None:
    """``source`` compiled with ``flags`` into ``folder`` (once per digest), with its digest; ``None`` where that
    failed."""
    compiler = compiler_for(source)
    if compiler is None:
        return None
    digest = _digest(compiler.encode(), " ".join(flags).encode(), source.read_bytes(),
                     *(h.read_bytes() for h in _local_headers(source)))
    target = folder / f"{source.stem}-{digest}.o"
    if target.exists() or _write_atomically(target, lambda out: [compiler, *flags, "-c", str(source), "-o", str(out)]):
        return target, digest
    return None


@contextmanager
def _builds_in_turn(folder: Path):
    """Held while this process builds in ``folder``: an exclusive ``flock`` on its ``.lock`` file (two test workers
    or ranks starting together compile each source once, not once each); nothing where the platform has no
    ``fcntl`` or the folder takes no lock file (the builds still write whole files)."""
    try:
        import fcntl
        handle = open(folder / ".lock", "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_library(stem: str, sources: list[Path], flags: list[str], cxx_flags: tuple[str, ...] = (),
                  libraries: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """``sources`` (``.c`` compiled with ``flags``, C++ with ``flags`` and ``cxx_flags``), linked with ``libraries``
    (e.g. ``-ltorch_cpu``) into ``$COMPRESSDIT_CACHE/native/STEM-<digest>.so``, loaded; ``None`` where that fails
    (read-only cache, no compiler, a compile error: the caller's PyTorch path runs)."""
    folder = default_cache_dir() / "native"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        jobs = [(s, flags if s.suffix == ".c" else [*flags, *cxx_flags]) for s in sources]
        workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                             else os.cpu_count() or 1))
        with _builds_in_turn(folder):
            with ThreadPoolExecutor(workers) as pool:  # each compile is a process of its own
                objects = list(pool.map(lambda job: _object(job[0], job[1], folder), jobs))
            if any(o is None for o in objects):
                return None
            linker = compiler_for(next((s for s in sources if s.suffix != ".c"), sources[0]))
            link = ["-shared", *(["-fopenmp"] * ("-fopenmp" in flags)), *libraries]
            target = folder / f"{stem}-{_digest(*(d.encode() for _, d in objects), ' '.join(link).encode())}.so"
            if not target.exists() and (linker is None or not _write_atomically(
                    target, lambda out: [linker, *(str(o) for o, _ in objects), *link, "-o", str(out)])):
                return None
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError):
        return None
