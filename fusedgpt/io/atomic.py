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

An existing *empty* target (for example a mount point, which cannot be renamed) is filled
in place instead: there is nothing in it to lose.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

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


def sha256(path: Path) -> str:
    """The hex sha256 of a file's contents, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    except OSError as exc:
        recover(target)
        if exc.errno in (errno.EBUSY, errno.EXDEV):
            raise OSError(exc.errno, f"cannot replace {target} in one step: it is a mount point or on another file "
                                     f"system than {target.parent} ({exc.strerror}); write into an empty directory "
                                     "instead, or a new one beside it") from exc
        raise
    except BaseException:
        recover(target)
        raise
    fsync(target.parent)
    if replacing:
        shutil.rmtree(backup_path(target))


@contextlib.contextmanager
def replacing(target: Path, marker: Optional[str] = None) -> Iterator[Path]:
    """An empty staging directory to write ``target``'s new contents into; on a clean exit it
    is swapped in (:func:`swap_in`), on an error deleted, leaving ``target`` as it was.

    An existing empty ``target`` has nothing to lose and may be a mount point, which cannot
    be renamed: it is filled in place instead, from a staging directory inside it, the file
    ``marker`` (the one whose presence tells readers the contents are complete) moved in last.
    """
    target = Path(target)
    if target.is_dir() and not any(target.iterdir()):
        with _filling(target, marker) as staging:
            yield staging
        return
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)  # left by a writer that was killed
    staging.mkdir(parents=True)
    try:
        yield staging
        swap_in(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def _filling(target: Path, marker: Optional[str]) -> Iterator[Path]:
    """:func:`replacing` for an empty ``target``; on an error it is left empty again."""
    staging = target / ("." + target.name + STAGING_SUFFIX)
    staging.mkdir()
    try:
        yield staging
        for entry in sorted(staging.iterdir(), key=lambda entry: entry.name == marker):
            os.rename(entry, target / entry.name)
        staging.rmdir()
        fsync(target)
    except BaseException:
        for entry in target.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        raise
