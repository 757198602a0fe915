"""The result-file guarantees every command relies on (``cad_apps.io``): atomic, durable
writes, settings compared both ways, locks that exclude or wait, and torchrun shards that
cover every item once."""
import os
import threading
import time

import pytest

from cad_apps import io
from cad_apps.distributed import Dist


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        io.write_atomic(str(path), write)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_json_reaches_the_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    """fsync before os.replace: after a crash the path holds the old file or the whole new
    one, never an empty file."""
    calls = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync") or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: calls.append("replace") or replace(a, b))
    io.write_json_atomic(str(tmp_path / "r.json"), {"a": 1})
    assert calls == ["fsync", "replace"]


def test_settings_difference_compares_both_ways():
    """A setting only the file has (or only the run has) is a difference too; tuples equal the
    lists JSON turns them into."""
    assert io.settings_difference({"a": 1, "b": 2}, {"a": 1}) == "b: 2 in the file vs None now"
    assert io.settings_difference({"a": 1}, {"a": 1, "c": 3}) == "c: None in the file vs 3 now"
    assert io.settings_difference({"s": [8, 16]}, {"s": (8, 16)}) == ""


def test_a_lock_excludes_at_once_or_after_its_wait(tmp_path):
    path = str(tmp_path / "out.json")
    held, release = threading.Event(), threading.Event()

    def holder():
        with io.OutputLock(path):
            held.set()
            release.wait(10)
    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(10)
        with pytest.raises(io.OutputBusyError, match="being written by another"):
            with io.OutputLock(path):
                pass
        threading.Timer(0.3, release.set).start()
        start = time.monotonic()
        with io.OutputLock(path, wait=10):  # a shared writer waits for the holder
            waited = time.monotonic() - start
        assert 0.2 < waited < 10
    finally:
        release.set()
        thread.join()


def test_a_symlink_and_its_target_are_one_output(tmp_path):
    """write_atomic replaces a symlink's target, so the lock must be the target's too: two
    runs given the link and the file must not both write."""
    target = tmp_path / "r.json"
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    with io.OutputLock(str(target)):
        with pytest.raises(io.OutputBusyError, match="being written by another"):
            with io.OutputLock(str(link)):
                pass


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_every_item_once_on_any_node(world):
    """Ranks are global: with several nodes the node-local rank repeats, the global one does
    not (8 items, local ranks as on nodes of 2 processes)."""
    items = list(range(8))
    shards = [Dist(rank=r, world=world, local_rank=r % 2, active=world > 1).shard(items)
              for r in range(world)]
    assert sorted(i for s in shards for i in s) == items
    assert [len(s) for s in shards] == [len(items[r::world]) for r in range(world)]


def _on_main_worker(rank: int, world: int, port: int, folder: str) -> None:
    import torch.distributed as td

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    td.init_process_group("gloo", rank=rank, world_size=world)
    dist = Dist(rank=rank, world=world, active=True)
    try:
        def write():  # the final write of rank 0 fails (a full disk)
            raise OSError(28, "No space left on device")

        try:
            dist.on_main(write)
            seen = "no error"
        except OSError as e:
            seen = f"{type(e).__name__}: {e}"
        dist.on_main(lambda: None)  # the group still works: nobody left in a collective
        with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
            f.write(seen)
    finally:
        td.destroy_process_group()


def test_a_failed_final_write_on_rank_0_stops_every_rank_with_its_error(tmp_path):
    """The final write after a sharded loop ran on rank 0, then a barrier: where it failed,
    rank 0 left and the others failed in gloo with a traceback. ``Dist.on_main`` gives every
    rank the same error (2 processes on gloo)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_on_main_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    seen = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert seen == ["OSError: [Errno 28] No space left on device"] * 2, seen
