"""Where this process sits in the gang, as torchrun describes it through the environment."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def from_env() -> WorldInfo:
    """torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE for every worker."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return WorldInfo(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
    )


# torch is imported inside the functions: reading the spec (and failing on a bad
# one) should not wait for it.


def use_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def backend() -> str:
    """NCCL between GPUs, gloo on CPU-only pods."""
    return "nccl" if use_cuda() else "gloo"


def device(world: WorldInfo) -> torch.device:
    import torch

    return torch.device("cuda", world.local_rank) if use_cuda() else torch.device("cpu")


def init(world: WorldInfo, timeout_s: int = 1800) -> None:
    """Joins the process group early, so data preparation can use barriers.

    accelerate (under Trainer) finds the group already initialised and reuses it.
    The long timeout covers rank 0 downloading a model while the others wait.
    """
    import torch
    import torch.distributed as torch_dist

    if not world.distributed or torch_dist.is_initialized():
        return
    if use_cuda():
        torch.cuda.set_device(world.local_rank)
    torch_dist.init_process_group(backend=backend(), timeout=datetime.timedelta(seconds=timeout_s))


def barrier() -> None:
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()


@contextlib.contextmanager
def local_main_first(world: WorldInfo) -> Iterator[None]:
    """Local rank 0 downloads into the node's cache first; the others then find it there."""
    if not world.is_local_main:
        barrier()
    try:
        yield
    finally:
        if world.is_local_main:
            barrier()


def any_rank(flag: bool, world: WorldInfo) -> bool:
    """True when the flag is set on any rank, so every rank takes the same branch (no collective hangs)."""
    import torch
    import torch.distributed as torch_dist

    if not world.distributed or not torch_dist.is_initialized():
        return flag
    t = torch.tensor([1 if flag else 0], device=device(world))
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(value: T, world: WorldInfo) -> T:
    """Rank 0's value on every rank (what the others pass is ignored), so all act on one decision."""
    import torch.distributed as torch_dist

    if not world.distributed or not torch_dist.is_initialized():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def shutdown() -> None:
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        with contextlib.suppress(Exception):
            torch_dist.destroy_process_group()
