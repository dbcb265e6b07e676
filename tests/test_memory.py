"""compressdit.memory: free heap pages go back to the OS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from compressdit.memory import _malloc_trim, release_free_heap

# In a fresh process (the heap's state and glibc's mmap threshold depend on everything the process did before):
# what a streamed block leaves behind, medium tensors (below glibc's 32 MB mmap ceiling, so on the heap) freed under
# live ones allocated after them, which keep the heap from shrinking by itself.
SCENARIO = textwrap.dedent("""
    import ctypes, ctypes.util, json
    from pathlib import Path
    import torch
    from compressdit.memory import release_free_heap

    def rss_mib():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    M_MMAP_THRESHOLD = -3  # glibc's mallopt: allocations below 32 MB from the heap, as in a long run
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 32 << 20)
    holes, pinned = [], []
    for _ in range(150):  # 300 MB, pages touched, each hole below a live 64 KB tensor: no free run reaches the top
        holes.append(torch.ones(2 << 20, dtype=torch.uint8))
        pinned.append(torch.ones(64 << 10, dtype=torch.uint8))
    del holes
    before = rss_mib()
    released = release_free_heap()
    print(json.dumps({"before": before, "after": rss_mib(), "released": released, "pinned": sum(int(p.sum()) for p in pinned)}))
""")


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_heap_holes_leave_the_resident_set():
    out = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["released"] is True and result["pinned"] == 150 << 16
    assert result["before"] - result["after"] > 200, result  # of the 300 MB freed


def test_nothing_to_release_is_not_an_error():
    release_free_heap()
    assert release_free_heap() in (True, False)
