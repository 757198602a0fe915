"""Sharding work over ``torchrun`` processes (``torch.distributed``), for eval and keypoints.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything is a no-op on one process. Under
``torchrun --nproc_per_node=N`` every process takes ``items[rank::world]``, rank 0 gathers the
records and writes the results; the process group is torn down however the run ends.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Dist", "init_distributed"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        return items[self.rank::self.world]

    def gather(self, obj) -> list:
        """Rank 0: every rank's ``obj`` (a list); other ranks: ``None``."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.active = False


def init_distributed(device_type: str) -> Dist:
    """The process group of a ``torchrun`` launch (NCCL on CUDA, Gloo on CPU), or a
    single-process :class:`Dist`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as dist
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return Dist(rank, world, local, True)
