"""One writer at a time: an exclusive lock on a directory (a bank, a run directory).

``with DirLock(path, what="bank"):`` holds ``path/.mtpeft.lock`` under ``fcntl.flock``. The kernel drops a
flock when its holder dies, however it dies (SIGKILL included), so a lock left by a dead process is
recovered without guessing from pids; the file still records the holder (pid, host, command, since) so a
second writer is refused with a message that names who holds it. The file itself is never deleted (deleting
it would let two processes lock two different files of the same name).

The lock is re-entrant within one process (a run that holds its bank's lock may call ``bank.save``, which
takes it too): a per-process count keyed by the directory's real path.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from .errors import MtpeftError

LOCK_NAME = ".mtpeft.lock"
_held: dict[str, list] = {}  # realpath -> [fd, count]
_guard = threading.Lock()

try:  # POSIX; on a system without fcntl the lock is a no-op with a warning in the docs
    import fcntl
except ImportError:  # pragma: no cover - not on the platforms this project runs on
    fcntl = None


def holder(path: str | Path) -> dict | None:
    """What the lock file of ``path`` says about its last holder (None if unreadable or absent)."""
    try:
        with open(Path(path) / LOCK_NAME, encoding="utf-8") as f:
            info = json.loads(f.read(4096) or "null")
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process"
    cmd = str(info.get("command", ""))[:200]
    return (f"process {info.get('pid')} on {info.get('host')} (since {info.get('since')}"
            + (f", running `{cmd}`" if cmd else "") + ")")


class DirLock:
    """Exclusive, re-entrant-per-process lock on directory ``path`` (created if missing)."""

    def __init__(self, path: str | Path, what: str = "directory"):
        self.path = Path(path)
        self.what = what
        self._key: str | None = None

    def acquire(self) -> DirLock:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MtpeftError(f"cannot create {self.what} directory {self.path} ({e.strerror or e}); give a "
                              "directory you can write to, whose parents are directories") from None
        if self.path.is_symlink():
            raise MtpeftError(f"{self.what} {self.path} is a symbolic link; give the real directory")
        key = os.path.realpath(self.path)
        with _guard:
            if key in _held:
                _held[key][1] += 1
                self._key = key
                return self
            lock_file = self.path / LOCK_NAME
            if lock_file.is_symlink():
                raise MtpeftError(f"{lock_file} is a symbolic link; remove it (it must be a plain file)")
            try:
                fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            except OSError as e:
                raise MtpeftError(f"cannot lock {self.what} {self.path}: {lock_file} cannot be created or opened "
                                  f"({e.strerror or e}); give a directory you can write to") from None
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise MtpeftError(
                        f"{self.what} {self.path} is in use by {_describe(holder(self.path))}; wait for it to "
                        "finish, or stop it, then run this again") from None
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": " ".join(sys.argv)[:500]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _held[key] = [fd, 1]
            self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _guard:
            entry = _held.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held[self._key]
                    os.close(entry[0])  # closing the descriptor drops the flock
        self._key = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked_here(path: str | Path) -> bool:
    """This process holds the lock of ``path``."""
    return os.path.realpath(path) in _held
