"""What a command wrote into its output directory, so that it never overwrites anything else.

Commands that write several files into ``--out`` (the fine-tuning commands: their data, metrics,
results, exports) record each file they write -- its path, size and sha256 -- in
``OUT/.fusedgpt-files.json``. Before writing anything, a command checks that every file
already in ``--out`` is one that such a record lists *with the same contents*: a user's own
``data/train.csv`` is refused even though a command would write a file of that name, and so is
one of our files that a user has since edited.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

from fusedgpt.io.atomic import sha256
from fusedgpt.io.runlock import LOCK_FILE

RECORD_FILE = ".fusedgpt-files.json"
_RECORD_STAGING = RECORD_FILE + ".tmp"
_OWN_FILES = (RECORD_FILE, _RECORD_STAGING, LOCK_FILE)  # bookkeeping, never data
_SHOWN = 5

PathLike = Union[str, os.PathLike]


def _read_record(out: Path) -> dict[str, dict]:
    try:
        record = json.loads((out / RECORD_FILE).read_text())
    except (OSError, ValueError):  # none yet, or damaged: then nothing counts as ours
        return {}
    files = record.get("files") if isinstance(record, dict) else None
    return files if isinstance(files, dict) else {}


def _files_under(out: Path) -> list[str]:
    return sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.relative_to(out).as_posix() not in _OWN_FILES
    )


def _matches(path: Path, entry: object) -> bool:
    return (isinstance(entry, dict) and not path.is_symlink() and path.stat().st_size == entry.get("bytes")
            and sha256(path) == entry.get("sha256"))


def foreign_files(out: PathLike) -> list[str]:
    """The files under ``out`` (relative paths) that no fusedgpt command recorded writing,
    or that changed since."""
    out = Path(out)
    if not out.is_dir():
        return []
    record = _read_record(out)
    return [name for name in _files_under(out) if not _matches(out / name, record.get(name))]


def check_only_ours(out: PathLike, command: str) -> None:
    """Refuse an ``out`` that holds files a fusedgpt command did not write.

    Raises:
        ValueError: ``out`` is a file, or holds such files (naming the first few).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; it must be a directory")
    foreign = foreign_files(out)
    if foreign:
        shown = ", ".join(foreign[:_SHOWN]) + (f", ... ({len(foreign)} in all)" if len(foreign) > _SHOWN else "")
        raise ValueError(f"--out {out} holds files that fusedgpt did not write, or that changed since ({shown}); "
                         f"{command} writes its data, metrics and results there and would overwrite them: "
                         "choose a new or empty directory")


def record_written(out: PathLike, *paths: PathLike) -> None:
    """Record the files ``paths`` (inside ``out``; a directory stands for every file under
    it) as written by fusedgpt with their current contents. The record is replaced in one
    step (a temporary file renamed over it)."""
    out = Path(out)
    files = _read_record(out)
    for path in map(Path, paths):
        found = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in found:
            files[file.absolute().relative_to(out.absolute()).as_posix()] = {
                "bytes": file.stat().st_size, "sha256": sha256(file)}
    tmp = out / _RECORD_STAGING
    tmp.write_text(json.dumps({"format": "fusedgpt-written-files", "files": files}, indent=1) + "\n")
    os.replace(tmp, out / RECORD_FILE)
