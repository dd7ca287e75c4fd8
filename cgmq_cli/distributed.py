"""Data-parallel runs under torchrun: the process group and the few collectives CGMQ needs.

Weight epochs use PyTorch's DistributedDataParallel. Gate epochs all-reduce
the gate gradients (and the repair/fill probes) so that every rank takes the
same gate step and reaches the same widths; that is asserted after every gate
epoch. Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from cgmq_cli.errors import TrainingError, UsageError


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"  # where collectives run: the rank's GPU with NCCL, the CPU with gloo

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks (identity with one process)."""
        if not self.enabled:
            return values
        out = values.to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(values.device)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        return self.sum(values) / self.world

    def all_true(self, flag: bool) -> bool:
        """True only if ``flag`` holds on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def check_same(self, values: list[int], what: str) -> None:
        """Raise when ranks disagree (e.g. on the widths after a gate epoch)."""
        if not self.enabled:
            return
        mine = torch.tensor(values, dtype=torch.float64, device=self.device)
        gathered = [torch.zeros_like(mine) for _ in range(self.world)]
        dist.all_gather(gathered, mine)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise TrainingError(f"ranks disagree on {what}; stopping", "please report this with the run's train.log")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def from_env(device: str) -> DistContext:
    """Join torchrun's process group when WORLD_SIZE > 1 (NCCL on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        # Every rank checks the node's process count, not only its own LOCAL_RANK: a rank whose GPU exists
        # would otherwise join the group and wait for the failed one until torchrun kills it (30 s on an H200).
        per_node = max(int(os.environ.get("LOCAL_WORLD_SIZE", "0")), local + 1)
        gpus = torch.cuda.device_count()
        if gpus < per_node:
            raise UsageError(f"torchrun started {per_node} processes on this node but it has {gpus} GPU"
                             f"{'' if gpus == 1 else 's'} (rank {rank}, LOCAL_RANK {local})",
                             f"use --nproc_per_node {max(gpus, 1)} or fewer with --device cuda"
                             + ("" if gpus else ", or --device cpu"))
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("CGMQ_DIST_TIMEOUT_MIN", "30"))))
    return DistContext(rank=rank, world=world, local_rank=local,
                       device=f"cuda:{local}" if backend == "nccl" else "cpu")


def missing_backend(device: str) -> str | None:
    """The backend ``device`` needs when this machine lacks it; None when it is there (or ``device`` is cpu)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "CUDA"
    if device == "mps" and not torch.backends.mps.is_available():
        return "Apple's Metal (MPS)"
    return None


def device_for(ctx: DistContext, device: str) -> str:
    """``cuda`` becomes ``cuda:<local rank>`` in a distributed run."""
    return f"cuda:{ctx.local_rank}" if ctx.enabled and device == "cuda" else device


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
