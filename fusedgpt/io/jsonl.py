"""Append-only JSON Lines logs (``metrics.jsonl``) that survive a torn last line.

A process killed in the middle of an append, or a disk that fills during one, leaves the
last line incomplete. Readers skip such a line, and a writer that goes on appending first
drops it (:func:`repair_torn_tail`), in both cases with a warning naming the file: a log is
a record of the run, never a reason to refuse to continue it. A record is one
``json.dumps`` line written with a single ``write``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, os.PathLike]


def _parse(path: Path) -> tuple[list[dict[str, Any]], list[int], bool]:
    """The records, the numbers of the lines that are not JSON objects, and whether the
    file ends without a newline."""
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    damaged: list[int] = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged.append(number)
    return records, damaged, bool(data) and not data.endswith(b"\n")


def _load(path: Path, action: str) -> tuple[list[dict[str, Any]], list[int], bool]:
    """:func:`_parse` for a file that may be missing, warning (naming the file and the lines,
    then ``action``) about lines that are not whole records."""
    if not path.exists():
        return [], [], False
    records, damaged, unterminated = _parse(path)
    if damaged:
        warnings.warn(f"{path}: line {', '.join(map(str, damaged))} is not a whole JSON record (cut short by an "
                      f"interrupted write?); {action}", stacklevel=3)
    return records, damaged, unterminated


def read_records(path: PathLike) -> list[dict[str, Any]]:
    """The records of a JSON Lines log, oldest first (none if it does not exist); lines that
    are not whole records are left out with a warning naming the file and the lines."""
    return _load(Path(path), "ignoring it")[0]


def repair_torn_tail(path: PathLike) -> list[dict[str, Any]]:
    """Make a JSON Lines log safe to append to, and return its records: lines that are not
    whole records (a torn last line) are dropped, with a warning naming the file and the
    lines, and a last record without its newline gets one. A missing file stays missing."""
    records, damaged, unterminated = _load(Path(path), "dropping it")
    if damaged:
        rewrite(path, records)
    elif unterminated:
        with open(path, "ab") as f:
            f.write(b"\n")
    return records


def rewrite(path: PathLike, records: list[dict[str, Any]]) -> None:
    """Replace the log's contents by ``records`` in one step (a temporary file renamed over
    it), so a crash leaves the old log or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
