"""Sharding work over ``torchrun`` processes (``torch.distributed``), for eval and keypoints.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything is a no-op on one process. Under
``torchrun --nproc_per_node=N`` every process takes ``items[rank::world]``, rank 0 gathers the
records after every step and writes the results (:meth:`Dist.share_step`); an error on one
rank stops every rank with its message (:meth:`Dist.raise_first`); the process group is torn
down however the run ends.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Callable

__all__ = ["Dist", "init_distributed", "resolve_device", "cpu_name", "device_name"]


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

    def raise_first(self, error: BaseException | None) -> None:
        """Collective: where any rank passes an error, every rank raises the first one (in rank
        order), the rank that had it its own object, the others a copy of the same class and
        message. So every rank stops with one message and none is left waiting in a later
        collective (where it would fail with the backend's traceback)."""
        if not self.active:
            if error is not None:
                raise error
            return
        import torch.distributed as dist
        errors = [None] * self.world
        dist.all_gather_object(errors, None if error is None else _portable(error))
        first = next((r for r, e in enumerate(errors) if e is not None), None)
        if first is None:
            return
        if first == self.rank:
            raise error
        raise errors[first]

    def share_step(self, records: list, error: BaseException | None,
                   write: Callable[[list], None]) -> None:
        """Collective, once per step of a sharded loop, on every rank whether its step went
        well or not: rank 0 gathers every rank's ``records`` (those finished before an
        ``error`` included) and, where any rank has some, passes the lists (one per rank, in
        rank order) to ``write``; then, where a rank had an ``error`` (or ``write`` raised
        one: a full disk), every rank raises the first (:meth:`raise_first`). So the records
        the ranks finished in the step of an error are written, and every rank stops with one
        message instead of the others failing in the next collective."""
        gathered = self.gather(records)
        if self.main and any(gathered):  # nothing new: the results stay as they are
            try:
                write(gathered)
            except Exception as e:
                error = error or e
        self.raise_first(error)

    @contextlib.contextmanager
    def errors_shared(self):
        """Collective, on every rank: ``with dist.errors_shared():`` around a phase (setup, a
        final write on rank 0) makes an error raised in it on any rank stop every rank with
        that error at the end of the block (:meth:`raise_first`), instead of leaving the
        others waiting in the next collective."""
        error = None
        try:
            yield
        except Exception as e:
            error = e
        self.raise_first(error)

    def on_main(self, fn: Callable[[], None]) -> None:
        """Collective: rank 0 runs ``fn`` (a final write); an error there stops every rank with
        its message, where a barrier after it would leave the others failing in the backend
        once rank 0 exits."""
        with self.errors_shared():
            if self.main:
                fn()

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.active = False


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (to reach the other ranks), else its nearest built-in
    base class (a ``ValueError`` stays one: the commands print those in one line) with its
    class and message."""
    import pickle
    try:
        copy = pickle.loads(pickle.dumps(error))
        if type(copy) is type(error) and str(copy) == str(error):
            return error
    except Exception:  # an exception whose arguments do not pickle back
        pass
    base = next(c for c in type(error).__mro__ if c.__module__ == "builtins")
    try:
        return base(f"{type(error).__name__}: {error}")
    except Exception:  # a built-in base that needs other arguments (UnicodeDecodeError)
        return RuntimeError(f"{type(error).__name__}: {error}")


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


def resolve_device(name=None, option: str = "--device") -> str:
    """The device to run on (default: cuda when available), checked: a clear message instead
    of torch's for a device that is not one, or not on this machine."""
    import torch

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{option} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{option} {name}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {name} requested but no CUDA device is available; use "
                             "--device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {name}: this machine has {torch.cuda.device_count()} "
                             "CUDA device(s)")
    return name


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    """The CPU model (``lscpu``'s "Model name"), which the speed of CPU runs depends on."""
    import platform
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """What a time was measured on: the GPU's name, or the CPU model and thread count."""
    import torch
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({cpu_name()}, {torch.get_num_threads()} threads)"
