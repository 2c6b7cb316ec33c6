"""Multi-process training with `torchrun` and DistributedDataParallel.

`torchrun --nproc_per_node=N -m latentseg train ...` starts N copies of the training command and
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for each; `train` reads them
through `setup`. Without them (a plain `latentseg train`) nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from latentseg.errors import LatentSegError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, validates and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_environment() -> World:
    """The RANK / WORLD_SIZE / LOCAL_RANK that torchrun sets; one process when they are absent."""

    def read(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise LatentSegError(f"environment variable {name}={raw!r} is not an integer") from None

    world = World(read("RANK", 0), read("WORLD_SIZE", 1), read("LOCAL_RANK", 0))
    if world.size < 1 or not 0 <= world.rank < world.size:
        raise LatentSegError(f"RANK={world.rank} does not fit WORLD_SIZE={world.size}")
    return world


def setup(device_name: str, timeout_minutes: float) -> tuple[World, torch.device]:
    """Join the process group (gloo on CPU, nccl on CUDA) and pick this rank's device.

    A collective that waits longer than `timeout_minutes` for another rank fails instead of hanging.
    """
    from latentseg.infer import resolve_device

    world = world_from_environment()
    device = resolve_device(device_name)
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise LatentSegError(
                f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} CUDA device(s); "
                "start at most one process per GPU (--nproc_per_node)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return world, device


def teardown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def from_rank0(world: World, value: float, device: torch.device) -> float:
    """Rank 0's `value` on every rank: decisions that depend on a rank's own clock (the time budget,
    the learning rate that follows it) must be identical everywhere, or the ranks drift apart and
    one leaves the loop while the others wait for it."""
    if not world.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return float(tensor.item())


def wrap(module: torch.nn.Module, world: World, find_unused_parameters: bool = False) -> torch.nn.Module:
    """`module` in DistributedDataParallel (gradients averaged over ranks in backward), or as it is.

    `find_unused_parameters` is needed while a step leaves some trainable parameters out of the
    graph (pre-training only the condition network); it costs a graph walk per step.
    """
    if not world.distributed:
        return module
    return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=find_unused_parameters)


def lost_peer_message(world: World, err: BaseException, out_dir) -> str:
    return (
        f"rank {world.rank} of {world.size}: lost contact with the other training processes "
        f"({' '.join(str(err).split())[:300]}); the last checkpoint in {out_dir} is intact, "
        "continue with --resume"
    )
