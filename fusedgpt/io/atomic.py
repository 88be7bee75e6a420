"""Replacing a directory (a checkpoint, a prepared data set) by a new, complete one so that
a crash at any moment leaves one whole copy, old or new, under the directory's name.

The new directory is assembled at :func:`staging_path` (a hidden sibling, so it is on the
same file system and the renames below are atomic), most simply inside
:func:`replacing`. :func:`swap_in` then renames the old
directory to :func:`backup_path`, the new one into place, and only then deletes the old
one. Two renames cannot be one step, so a process killed between them leaves the old copy
at the backup path and nothing at the target: :func:`recover` puts it back, and every reader
and writer of these directories calls it first. Stale staging directories (from a killed
writer) may be deleted freely; backups never are while the target is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

STAGING_SUFFIX = ".tmp"
BACKUP_SUFFIX = ".replaced"


def _hidden_sibling(target: Path, suffix: str) -> Path:
    target = Path(target).absolute()
    if not target.name:
        raise ValueError(f"{target} has no parent directory to replace it in")
    return target.with_name(f".{target.name}{suffix}")


def staging_path(target: Path) -> Path:
    """Where the directory that will replace ``target`` is assembled: ``.NAME.tmp`` beside it."""
    return _hidden_sibling(target, STAGING_SUFFIX)


def backup_path(target: Path) -> Path:
    """Where ``target``'s previous contents wait while :func:`swap_in` replaces it."""
    return _hidden_sibling(target, BACKUP_SUFFIX)


def target_of_backup(backup: Path) -> Path:
    """The directory a :func:`backup_path` belongs to."""
    return backup.with_name(backup.name.removeprefix(".").removesuffix(BACKUP_SUFFIX))


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries (the renames inside it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(target: Path) -> None:
    """Finish what a :func:`swap_in` killed between its renames left behind: the old
    directory goes back to ``target`` when the new one never arrived; once the new one
    stands there, the old copy is deleted."""
    backup = backup_path(target)
    if not backup.exists():
        return
    if target.exists():
        shutil.rmtree(backup)
    else:
        os.rename(backup, target)
        fsync(target.parent)


def swap_in(staged: Path, target: Path) -> None:
    """Move the complete directory ``staged`` to ``target``; what ``target`` held is deleted
    only after the new directory is in place (on an error it is put back)."""
    recover(target)
    replacing = target.exists()
    try:
        if replacing:
            os.rename(target, backup_path(target))
        os.rename(staged, target)
    except BaseException:
        recover(target)
        raise
    fsync(target.parent)
    if replacing:
        shutil.rmtree(backup_path(target))


@contextlib.contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """An empty staging directory to write ``target``'s new contents into; on a clean exit it
    is swapped in (:func:`swap_in`), on an error deleted, leaving ``target`` as it was."""
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)  # left by a writer that was killed
    staging.mkdir(parents=True)
    try:
        yield staging
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
