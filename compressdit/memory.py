"""Handing the C heap's free memory back to the operating system between the steps of a long streamed run.

glibc serves allocations of up to 32 MB (its dynamic mmap threshold's ceiling) from the process heap, which only
shrinks from its top: a streamed run's per-layer temporaries (GPTQ's column blocks, packed int4 weights waiting in
the pending output shard) leave it full of free holes that still count in the resident set. On the FLUX.1-size
streamed GPTQ run the heap held 2.9 GB of resident pages between blocks, when the live data was a few hundred MB,
and the peak RSS went from 5.4 GB in the double-stream blocks to 6.2 GB by the end of the single-stream ones; with
the trim after each block and each GPTQ-rounded layer the same run peaked at 5.14 GB (bench/results/stream_flux_cpu.md).
``malloc_trim(0)`` returns every free page of the heap (not only its top) to the OS; elsewhere (musl, macOS,
Windows) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim(0)``); whether anything was released (False
    where the C library has no ``malloc_trim``)."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
