"""torch.distributed, launched by torchrun: the same config on one process or many.

Under torchrun (WORLD_SIZE > 1) each process joins a gloo (CPU) or NCCL (CUDA)
group; each rank draws its own windows from a seeded sampler; only rank 0 logs
and writes. `train.parallel` picks how the model is spread:

* `ddp` (default): every rank holds the whole model (DistributedDataParallel),
  and rank 0 alone evaluates and samples.
* `fsdp`: PyTorch's FSDP2 (`fully_shard`) shards every block and then the root,
  so each rank holds 1/N of the weights, gradients and optimizer state: the
  path for a model larger than one device. Every forward needs all ranks, so
  all of them evaluate and sample (rank 0 writes). Checkpoints gather full
  tensors, one at a time, into the same format as a one-process run, so an FSDP
  checkpoint resumes in one process, under DDP or under FSDP alike.

Without torchrun every method here is a no-op, so the loop has one code path.

torchrun sets OMP_NUM_THREADS=1 in each worker unless it is already set, so
`--nproc_per_node=2` on a 2-core CPU runs one thread per rank; DDP then
overlaps the gloo all-reduce of one bucket with the backward of the next.
"""

from __future__ import annotations

import contextlib
import inspect
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
    strategy: str = "ddp"  # ddp | fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        """Weights are split across ranks, so every forward pass needs every rank."""
        return self.enabled and self.strategy == "fsdp"

    def wrap(self, adapter: nn.Module) -> nn.Module:
        """DDP or FSDP around the adapter under torchrun; the adapter itself otherwise.

        DDP: buffers (the sinusoid table) are constants, so they are not
        re-broadcast every forward; gradients stay ordinary tensors (no bucket
        views), since update hooks may replace `p.grad`. FSDP shards each of
        the adapter's `shard_units()` and then the adapter, in place, moving each
        rank's shards to its device: the whole model never sits on one device.
        """
        if not self.enabled:
            return adapter
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            for unit, method in adapter.shard_units():
                fully_shard(unit, mesh=mesh)
                if method != "forward":
                    register_fsdp_forward_method(unit, method)
            fully_shard(adapter, mesh=mesh)
            return adapter
        cuda = self.device is not None and self.device.type == "cuda"
        ids = [self.device.index] if cuda else None
        ddp = nn.parallel.DistributedDataParallel
        # buffers are constants, so no per-forward sync (torch 2.13 renamed that switch)
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers"
                   in inspect.signature(ddp).parameters else "broadcast_buffers")
        return ddp(adapter, device_ids=ids, **{no_sync: False})

    def no_sync(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if self.sharded:
            model.set_requires_gradient_sync(last)
        elif self.enabled and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def full_state(self, state: Any) -> Any:
        """`state` (a state dict, nested) with every shard gathered into a whole CPU tensor.

        Collective under FSDP: every rank must call it, on the same structure.
        A tensor seen twice (a tied weight) is gathered once and stays shared.
        """
        if not self.sharded:
            return state
        from torch.distributed.tensor import DTensor

        done: dict[int, torch.Tensor] = {}

        def gather(x: Any) -> Any:
            if isinstance(x, dict):
                return {k: gather(v) for k, v in x.items()}
            if isinstance(x, list | tuple):
                return type(x)(gather(v) for v in x)
            if isinstance(x, DTensor):
                if id(x) not in done:
                    done[id(x)] = x.full_tensor().cpu()
                return done[id(x)]
            return x

        return gather(state)

    def shard_optimizer_state(self, state: dict, optimizer: torch.optim.Optimizer) -> dict:
        """A whole-tensor optimizer state dict cut to this rank's shards (no communication)."""
        if not self.sharded:
            return state
        from torch.distributed.tensor import distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        out = {}
        for i, entry in state["state"].items():
            p = params[int(i)]
            out[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements,
                                           src_data_rank=None)
                      if torch.is_tensor(v) and v.shape == p.shape else v
                      for k, v in entry.items()}
        return {**state, "state": out}

    def any_rank(self, flag: bool) -> bool:
        """`flag` or-ed over all ranks, so that every rank takes the same branch.

        A Ctrl-C or a non-finite loss may reach one rank only, or one rank a step
        before another; a rank that stopped alone would leave the others waiting
        in a collective forever, and its checkpoint would never be written.
        """
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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

    def cleanup(self, ok: bool = True) -> None:
        """Leave the group; after a clean finish, only once every rank is done with it.

        After a failure there is no barrier: the other ranks may never reach it.
        """
        if self.enabled and dist.is_initialized():
            if ok:
                dist.barrier()
            dist.destroy_process_group()


def setup(device_name: str, strategy: str = "ddp") -> DistInfo:
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
    return DistInfo(rank, world, device, strategy)
