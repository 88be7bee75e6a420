"""One writer per run directory: an exclusive advisory lock held for a command's whole life.

Two commands writing one ``--out`` at once destroy each other's work (one deletes the
other's staging directories, both append to ``metrics.jsonl``). Every command that writes a
run directory therefore holds ``OUT/.fusedgpt.lock`` with ``fcntl.flock``; a second one is
refused with a message naming the holder's pid, which the lock file records.

A lock left by a process that died is no obstacle: the kernel releases ``flock`` locks when
their holder exits, however it exits (``kill -9`` included), so only a live process can hold
one; the stale pid in the file is simply overwritten. Within one process the lock is
re-entrant (a command may open the run before the trainer that runs it takes the lock again).
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import warnings
import weakref
from pathlib import Path
from typing import Optional, Union

LOCK_FILE = ".fusedgpt.lock"

PathLike = Union[str, os.PathLike]


class RunDirectoryBusy(OSError):
    """Another live process holds the run directory's lock."""


# Locks this process holds: real path of the lock file -> [file descriptor, holders].
_held: dict[str, list[int]] = {}
_held_guard = threading.Lock()


def holder_pid(out: PathLike) -> Optional[int]:
    """The pid recorded in ``out``'s lock file (the last process that took the lock), if any."""
    try:
        return int((Path(out) / LOCK_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _release(key: str) -> None:
    with _held_guard:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor releases the flock


class RunLock:
    """An exclusive lock on the run directory ``out`` (created if missing), taken on
    construction and released by :meth:`release`, on leaving a ``with`` block, when the
    object is garbage-collected, or when the process ends.

    Raises:
        RunDirectoryBusy: another live process holds it; the message names its pid.
    """

    def __init__(self, out: PathLike, command: str = "fusedgpt") -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise NotADirectoryError(f"--out {self.out} is a file; it must be a directory")
        self.out.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.out / LOCK_FILE)
        self._release = None
        with _held_guard:
            if key in _held:
                _held[key][1] += 1
            else:
                fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    os.close(fd)
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        # A file system without locks (some network mounts): go on, but say so.
                        warnings.warn(f"cannot lock {self.out} ({exc.strerror}); make sure no other process "
                                      "writes there")
                        return
                    pid = holder_pid(self.out)
                    who = f"process {pid}" if pid else "another process"
                    raise RunDirectoryBusy(
                        f"{self.out} is in use: {who} is writing to it (lock {self.out / LOCK_FILE}); "
                        f"wait for it to finish or stop it, or give {command} another --out"
                    ) from None
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                _held[key] = [fd, 1]
        self._release = weakref.finalize(self, _release, key)

    def release(self) -> None:
        """Give the lock up (once per holder in this process; the last one unlocks)."""
        if self._release is not None:
            self._release()

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
