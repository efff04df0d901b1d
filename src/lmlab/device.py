"""One code path for every device: pick it, and the autocast context for the dtype."""

from __future__ import annotations

import contextlib

import torch

from lmlab.errors import LmlabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmlabError("train.device is 'cuda' but no CUDA GPU is available; use auto or cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise LmlabError("train.device is 'mps' but MPS is not available. Use 'auto' or 'cpu'.")
    return torch.device(name)


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 matmuls beat float32 here: CUDA with bf16, or a CPU with AVX512-BF16/AMX.

    On a CPU without them (AVX2 only) bf16 matmuls are emulated and run many
    times slower than float32, so `auto` must not pick bf16 there.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> str:
    """`auto` is bfloat16 where it is fast (see fast_bf16), else float32."""
    if name != "auto":
        return name
    return "bfloat16" if fast_bf16(device) else "float32"


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Mixed precision for matmuls when dtype is not float32; weights stay float32."""
    dtype = resolve_dtype(dtype, device)
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type == "cpu":
        raise LmlabError("train.dtype float16 is not supported on CPU; use bfloat16.")
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def reuse_freed_memory() -> bool:
    """Let glibc keep freed blocks up to 32 MB in the heap for reuse (Linux; returns success).

    By default glibc hands each large block (a chunk of logits, a [tokens, 1536] MLP
    activation) back to the kernel when it is freed and maps it afresh on the next step,
    so every step pays page faults for memory it used a moment ago. Blocks up to 32 MB
    (glibc's ceiling for the threshold) now come from the heap and are reused; the peak
    memory is unchanged, but freed memory stays resident instead of being returned.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None or not hasattr(ctypes, "CDLL"):
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)
                    and libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        return False
