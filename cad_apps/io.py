"""Result files that are never lost or half-written.

- :func:`write_json_atomic` / :func:`save_torch_atomic`: serialise first, write a temporary file
  in the target's folder, fsync, ``os.replace``: a reader (or a resumed run) sees the old file or
  the new one, never a torn one.
- :class:`OutputLock`: one writer per output. A second run pointed at the same ``--out`` while
  the first is alive is refused with a message instead of silently overwriting its results
  (an advisory ``<out>.lock`` file, released when the process exits, even by ``kill -9``);
  :func:`check_not_busy` asks the same before a long command reaches that output.
- :func:`to_json`: JSON with one line per record (big result files stay readable and
  diffable).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

__all__ = ["write_json_atomic", "save_torch_atomic", "write_atomic", "to_json", "OutputLock",
           "OutputBusyError", "check_output_path", "check_not_busy", "read_json",
           "settings_difference"]


class OutputBusyError(RuntimeError):
    """Another live process writes the same output."""


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp_path)`` then ``os.replace(tmp_path, path)``; the temporary file is removed
    on failure, so nothing half-written is ever left at ``path``. A symlink at ``path`` is
    followed (its target is replaced, the link kept) and an existing file keeps its mode."""
    path = os.path.realpath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        if os.path.exists(path):
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(path: str, obj: Any, compact_depth: int = 2) -> None:
    """Write ``obj`` as JSON (:func:`to_json`) so that readers see the old or the new file."""
    text = to_json(obj, compact_depth=compact_depth) + "\n"  # a serialisation error writes nothing

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)


def save_torch_atomic(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file: a crash never leaves a truncated checkpoint."""
    import torch

    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def to_json(obj: Any, depth: int = 0, compact_depth: int = 2) -> str:
    """JSON with the outer ``compact_depth`` levels of dicts spread over lines and everything
    deeper on one line. NaN and infinities are refused (they are not JSON)."""
    if isinstance(obj, dict) and depth < compact_depth and obj:
        pad = " " * (depth + 1)
        items = [f"{pad}{json.dumps(str(k))}: {to_json(v, depth + 1, compact_depth)}"
                 for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    return json.dumps(obj, allow_nan=False, separators=(", ", ": "))


def read_json(path: str, fmt: str, what: str, fix: str) -> dict:
    """A results file written by this package: a JSON object whose ``"format"`` is ``fmt``.
    Anything else raises a ``ValueError`` naming the file, ``what`` it should be and ``fix``."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise ValueError(f"{path} is not {what}; {fix}")
    return obj


def settings_difference(old: dict, new: dict, here: str = "in the file") -> str:
    """``"k: old in the file vs new now, ..."`` for the settings that differ ('' if none); tuples
    and lists compare equal when their items do (JSON turns tuples into lists)."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    keys = list(new) + [k for k in old if k not in new]
    return ", ".join(f"{k}: {old.get(k)!r} {here} vs {new.get(k)!r} now" for k in keys
                     if norm(old.get(k)) != norm(new.get(k)))


def error_text(e: BaseException) -> str:
    """The message a command prints for ``e``: a DataLoader worker's error arrives as the worker's
    whole traceback in the message; its last line is the error itself."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1]
    return text


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes (which weights a result was computed with)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_output_path(path: str, what: str = "--out", folder: bool = False,
                      suffix: str = "") -> str:
    """Refuse an output path that cannot be written before any work is done: a file path that is
    a directory (or a folder path that is a file), a file path not ending in ``suffix`` (the
    format written; ``""``: any), or a parent that is a file."""
    path = os.path.abspath(os.fspath(path))
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{what} {path} is a file; give a folder")
    elif os.path.isdir(path):
        example = "output" + suffix if suffix else "results.json"
        raise ValueError(f"{what} {path} is a directory; give a file path, e.g. "
                         f"{os.path.join(path, example)}")
    elif suffix and not path.lower().endswith(suffix):
        raise ValueError(f"{what} {path}: this writes a {suffix[1:].upper()} file; give a path "
                         f"ending in {suffix}")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise ValueError(f"{what} {path}: {parent} is a file, not a folder")
    if parent and not os.access(parent, os.W_OK):
        raise ValueError(f"{what} {path}: cannot write in {parent}")
    return path


class OutputLock:
    """Exclusive advisory lock ``<path>.lock`` held while a run writes ``path``.

    ``with OutputLock(path):`` raises :class:`OutputBusyError` when another live process holds
    it, at once or after ``wait`` seconds (for short shared writes, such as appending a section
    to one markdown file); the message names the path and the fix. The lock dies with its
    process, so a killed run never blocks the next one."""

    def __init__(self, path: str, what: str = "--out", wait: float = 0):
        # the real path, as write_atomic writes it: a symlink and its target are one output
        self.path = os.path.realpath(os.fspath(path))
        self.what = what
        self.wait = wait
        self._lock = None

    def __enter__(self) -> "OutputLock":
        from filelock import FileLock, Timeout

        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        lock = FileLock(self.path + ".lock", thread_local=False)
        try:
            lock.acquire(timeout=self.wait)
        except Timeout:
            try:  # filelock also times out where the lock file cannot be created at all
                open(self.path + ".lock", "a").close()
            except OSError as e:
                raise ValueError(f"{self.what} {self.path}: cannot create its lock file "
                                 f"{self.path}.lock ({e.strerror}); choose a writable "
                                 f"{self.what}") from None
            raise OutputBusyError(
                f"{self.what} {self.path} is being written by another running process (lock "
                f"{self.path}.lock); wait for it to finish or choose another {self.what}") from None
        self._lock = lock
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def check_not_busy(path: str, what: str = "--out") -> None:
    """Raise :class:`OutputBusyError` (the message of :class:`OutputLock`) if another live process
    holds ``path``'s lock now: a command that writes several outputs in turn checks them all
    before its first run, instead of finding a busy one at its turn, hours later. Creates no
    file or folder (a lock is held only through its lock file)."""
    lock = OutputLock(path, what)
    if os.path.exists(lock.path + ".lock"):
        with lock:
            pass
