"""The machine a benchmark ran on, in one line, printed first by every benchmark.

Benchmarks run as scripts (`python benchmarks/x.py`), so this folder is on
sys.path and they import it as `from machine import describe`.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy
import torch

from lmlab.device import fast_bf16


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"machine: {platform.platform()} | CPU: {cpu_model()} | cores: {os.cpu_count()} | "
            f"python {platform.python_version()} | torch {torch.__version__} | "
            f"numpy {numpy.__version__} | threads {torch.get_num_threads()} | "
            f"fast bf16: {fast_bf16(torch.device('cpu'))} | load avg {load:.2f}")


def matmul_peak(dtype: torch.dtype, n: int | tuple[int, int, int], seconds: float = 1.5
                ) -> float:
    """Best GFLOP/s of an n x n matmul, or of (m x k) @ (k x p) for n = (m, k, p), over
    ~`seconds` (best, since others' load only slows it)."""
    m, k, p = (n, n, n) if isinstance(n, int) else n
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, p).to(dtype)
    a @ b
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * m * k * p / (time.perf_counter() - t0) / 1e9)
    return best
