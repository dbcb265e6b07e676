"""Timing and reporting helpers shared by bench/gpu_kernels.py and bench/gpu_e2e.py."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def out_dir(path: str | None) -> Path:
    """``--out``, else ``$OUT`` (the GPU machine's return folder), else bench/results."""
    folder = Path(path or os.environ.get("OUT") or ROOT / "bench" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    capability=".".join(map(str, torch.cuda.get_device_capability(device))))
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    else:
        info.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return info


def machine_line(info: dict) -> str:
    if info.get("gpu"):
        return (f"{info['gpu']} (sm {info['capability']}), torch {info['torch']}, CUDA {info['cuda']}, "
                f"triton {info.get('triton')}")
    return f"{info['cpu']} ({info['threads']} threads), torch {info['torch']}"


def median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int,
              flush: torch.Tensor | None = None) -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU (L2 flushed before each call when ``flush`` is given),
    ``perf_counter`` on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type != "cuda":
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(device)
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def error_text(error: BaseException) -> str:
    """One line for the JSON: the exception and where it was raised."""
    where = traceback.extract_tb(error.__traceback__)[-1] if error.__traceback__ else None
    place = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error).strip() else ''}{place}"


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)


def fmt_ms(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
