"""Training checkpoints: written atomically, verified on load.

A checkpoint is a directory ``OUT/ckpt_{step:08d}/`` holding

- ``model.safetensors``: the weights (tied weights stored once);
- ``state.pt``: the optimizer state (keyed by parameter name, as
  ``torch.distributed.checkpoint.state_dict`` writes it, so a checkpoint moves between one
  process, DDP and FSDP) and RNG states, plain tensors and containers only, read back with
  ``torch.load(weights_only=True)`` so loading never runs pickled code;
- ``meta.json``: model config, step, data position, training config, and the size and
  sha256 of the two files above.

It is assembled in a hidden temporary directory and renamed into place (see
:mod:`fusedgpt.io.atomic`, which also makes saving the same step again safe), so a save
that is interrupted leaves the previous checkpoints untouched, and any ``ckpt_*`` directory
is complete. Loading checks every file against ``meta.json`` first, so a truncated or
damaged checkpoint is a :class:`CheckpointError` naming the file, not an error from deep
inside safetensors or the unpickler. Opening a run directory falls back from a damaged
newest checkpoint to the newest one that verifies, with a warning naming what it skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import torch

from fusedgpt.io import atomic

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
FORMAT = "fusedgpt-checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d+)$")

PathLike = Union[str, os.PathLike]
ConfigT = TypeVar("ConfigT")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or does not fit the model."""


def checkpoint_name(step: int) -> str:
    return f"ckpt_{step:08d}"


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(out: PathLike) -> list[Path]:
    """The checkpoint directories in a run directory, oldest step first (after putting back
    any checkpoint whose replacement was cut short, see :func:`atomic.recover`)."""
    out = Path(out)
    if not out.is_dir():
        return []
    for backup in out.glob(".ckpt_*" + atomic.BACKUP_SUFFIX):
        atomic.recover(atomic.target_of_backup(backup))
    return sorted((p for p in out.iterdir() if p.is_dir() and _NAME.match(p.name)), key=_step_of)


def latest_checkpoint(out: PathLike) -> Optional[Path]:
    """The newest checkpoint in a run directory, or ``None``."""
    checkpoints = list_checkpoints(out)
    return checkpoints[-1] if checkpoints else None


def rng_state() -> dict[str, Any]:
    """Every random state a training step draws from (torch CPU, and CUDA when present)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    out: PathLike,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: Optional[dict[str, Any]],
    meta: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``OUT/ckpt_{step}`` atomically (replacing a checkpoint of the same step only
    once the new one is complete) and delete all but the newest ``keep_last`` checkpoints up
    to ``step``; newer ones (left by a run this one resumed behind) are kept.

    Args:
        weights: full (unsharded) tensors by parameter name, each storage once (leave out
            the alias of a tied weight).
        optimizer_state: saved with the current RNG states in ``state.pt``.
        meta: JSON-serialisable facts about the run (model config, data position, ...);
            ``step`` and the file checksums are added.
    Returns:
        the checkpoint directory.
    """
    from safetensors.torch import save_file

    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(out)  # first, so that a checkpoint a killed save displaced is back
    for stale in out.glob(".ckpt_*" + atomic.STAGING_SUFFIX):
        shutil.rmtree(stale, ignore_errors=True)  # left by a save that was killed
    final = out / checkpoint_name(step)
    with atomic.replacing(final) as tmp:
        save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()}, str(tmp / WEIGHTS_FILE))
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, tmp / STATE_FILE)
        files = {}
        for name in (WEIGHTS_FILE, STATE_FILE):
            atomic.fsync(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        record = {"format": FORMAT, "version": VERSION, **meta, "step": step, "files": files}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
        atomic.fsync(tmp / META_FILE)
    kept = [p for p in existing if _step_of(p) < step] + [final]
    for old in kept[:-keep_last]:
        shutil.rmtree(old)
    return final


@dataclass
class Checkpoint:
    """A verified checkpoint: its directory and ``meta.json``; the weights and state are
    read on demand by :meth:`load_weights` and :meth:`load_state`."""

    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    def model_config(self, config_class: type[ConfigT], backend: str) -> ConfigT:
        """The stored model's configuration as ``config_class`` (which has ``from_dict``),
        to run on ``backend``."""
        stored = self.meta.get("model")
        if not isinstance(stored, dict):
            raise CheckpointError(f"checkpoint {self.path} records no model configuration")
        try:
            return config_class.from_dict({**stored, "backend": backend})
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {self.path} records an invalid model configuration: {exc}") from exc

    def load_weights(self, model: torch.nn.Module) -> None:
        """Copy the stored weights into ``model`` (same architecture, any device); a tied
        weight stored once fills both of its names."""
        from safetensors.torch import load_model

        try:
            load_model(model, str(self.path / WEIGHTS_FILE), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"{self.path / WEIGHTS_FILE} does not fit the model: {exc}") from exc

    def load_state(self) -> dict[str, Any]:
        """``{"optimizer": state_dict or None, "rng": ...}``, loaded with ``weights_only=True``."""
        try:
            return torch.load(self.path / STATE_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # the unpickler raises many types; the checksum already passed
            raise CheckpointError(f"cannot load {self.path / STATE_FILE}: {exc}") from exc


def open_checkpoint(path: PathLike) -> Checkpoint:
    """Open a checkpoint directory, or a run directory's newest checkpoint that verifies, and
    check that every file is present, of the recorded size and checksum.

    A checkpoint named directly must verify. In a run directory, newer checkpoints that do
    not are skipped with a warning naming them (the run goes on from the newest good one).

    Raises:
        CheckpointError: a named checkpoint that is missing a file, truncated or damaged
            (naming the file); a run directory with no checkpoint, or none that verifies.
    """
    path = Path(path)
    if path.is_dir() and _NAME.match(path.name):
        return _verified(path)
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"no checkpoint in {path} (expected {path}/ckpt_NNNNNNNN/ or a checkpoint directory)")
    failures = []
    for candidate in reversed(checkpoints):
        try:
            checkpoint = _verified(candidate)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        for failure in failures:
            warnings.warn(f"skipping a newer checkpoint: {failure}; using {checkpoint.path}", stacklevel=2)
        return checkpoint
    raise CheckpointError(f"no checkpoint in {path} verifies: " + "; ".join(failures))


def _verified(path: Path) -> Checkpoint:
    """``path``'s checkpoint once every file matches its record in ``meta.json``."""
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: cannot read {META_FILE} ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "files" not in meta or "step" not in meta:
        raise CheckpointError(f"checkpoint {path} is damaged: {META_FILE} is not a fusedgpt checkpoint record")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}; this fusedgpt reads {VERSION}")
    for name in (WEIGHTS_FILE, STATE_FILE):
        expected = meta["files"].get(name)
        file = path / name
        if expected is None or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, expected {expected['bytes']} (truncated?)")
        if _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its recorded sha256")
    return Checkpoint(path, meta)

