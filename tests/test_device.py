"""Device and dtype resolution, and the single-process face of the distributed layer.

Why: `dtype: auto` must never pick bf16 on a CPU that emulates it (about 40x
slower than fp32 on the AVX2 machine this project is measured on), an absent
device must be a clear error rather than a silent fall-back, and without
torchrun the distributed layer must be a no-op so the loop has one code path.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from lmlab import device as dev
from lmlab.errors import LmlabError
from lmlab.train import distributed


def test_auto_device_is_cpu_without_accelerators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dev.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LmlabError, match="no CUDA GPU"):
        dev.resolve_device("cuda")
    with pytest.raises(LmlabError, match="MPS is not available"):
        dev.resolve_device("mps")


def test_auto_device_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.resolve_device("auto").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert dev.resolve_device("auto").type == "mps"


@pytest.mark.parametrize(("flags", "fast"), [
    ("fpu sse avx2 fma", False),
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_bf16 amx_tile", True),
])
def test_fast_bf16_reads_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: str,
                                       fast: bool) -> None:
    real_open = open

    def fake_open(path, *a, **k):
        if path == "/proc/cpuinfo":
            import io
            return io.StringIO(f"processor : 0\nflags : {flags}\n")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", fake_open)
    cpu = torch.device("cpu")
    assert dev.fast_bf16(cpu) is fast
    assert dev.resolve_dtype("auto", cpu) == ("bfloat16" if fast else "float32")
    assert dev.resolve_dtype("float32", cpu) == "float32"  # explicit choices are kept
    assert dev.resolve_dtype("bfloat16", cpu) == "bfloat16"


def test_autocast_contexts() -> None:
    cpu = torch.device("cpu")
    assert isinstance(dev.autocast(cpu, "float32"), contextlib.nullcontext)
    with dev.autocast(cpu, "bfloat16"):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with pytest.raises(LmlabError, match="float16 is not supported on CPU"):
        dev.autocast(cpu, "float16")


def test_distributed_is_a_no_op_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.setup("auto")
    assert (info.rank, info.world_size, info.is_main, info.enabled) == (0, 1, True, False)
    model = torch.nn.Linear(2, 2)
    assert info.wrap(model) is model
    assert info.gather_objects({"a": 1}) == [{"a": 1}]
    assert info.broadcast_str("run") == "run"
    assert isinstance(info.no_sync(model, last=False), contextlib.nullcontext)
    info.barrier()
    info.cleanup()


def test_distributed_cuda_without_gpu_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LmlabError, match="no CUDA GPU"):
        distributed.setup("cuda")
    with pytest.raises(LmlabError, match="MPS"):
        distributed.setup("mps")
