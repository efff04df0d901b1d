"""torch.distributed, launched by torchrun: the same config on one process or many.

Under torchrun (WORLD_SIZE > 1) each process joins a gloo (CPU) or NCCL (CUDA)
group and wraps the model in DistributedDataParallel; each rank draws its own
windows from a seeded sampler; only rank 0 logs, evaluates and checkpoints.
Without torchrun every method here is a no-op, so the loop has one code path.

torchrun sets OMP_NUM_THREADS=1 in each worker unless it is already set, so
`--nproc_per_node=2` on a 2-core CPU runs one thread per rank; DDP then
overlaps the gloo all-reduce of one bucket with the backward of the next.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmlab.errors import LmlabError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model under torchrun; the model itself otherwise.

        Buffers (the sinusoid table) are constants, so they are not re-broadcast
        every forward. Gradients stay ordinary tensors (no bucket views), since
        update hooks may replace `p.grad`.
        """
        if not self.enabled:
            return model
        cuda = self.device is not None and self.device.type == "cuda"
        ids = [self.device.index] if cuda else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.enabled and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_str(self, value: str) -> str:
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (so each sampler's state is checkpointed)."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def cleanup(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def setup(device_name: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a no-op otherwise.

    `cuda` (or `auto` with a GPU) gives NCCL and one GPU per local rank; anything
    else gives gloo on CPU. An explicit `cuda` without a GPU is an error, not a
    silent fall-back to CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cuda" and not torch.cuda.is_available():
        raise LmlabError("train.device is 'cuda' but no CUDA GPU is available to this "
                         "torchrun worker. Use train.device=cpu (gloo) or run on a GPU machine.")
    if device_name == "mps":
        raise LmlabError("Distributed training on MPS is not supported by PyTorch; use "
                         "train.device=cpu under torchrun, or one process on MPS.")
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise LmlabError(f"torchrun started local rank {local} but this machine has "
                             f"{torch.cuda.device_count()} GPU(s). Use --nproc_per_node="
                             f"{torch.cuda.device_count()} or fewer.")
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, device)
