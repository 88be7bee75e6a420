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

import errno
import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

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


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (the disk is full); the earlier ones are intact."""


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
    to ``step``; newer ones (left by a run this one resumed behind) are kept, and so is the
    newest checkpoint with finite weights. ``meta.json`` records whether the weights are
    finite (``weights_finite``): only such a checkpoint is a good one to go back to.

    Args:
        weights: full (unsharded) tensors by parameter name, each storage once (leave out
            the alias of a tied weight).
        optimizer_state: saved with the current RNG states in ``state.pt``.
        meta: JSON-serialisable facts about the run (model config, data position, ...);
            ``step`` and the file checksums are added.
    Returns:
        the checkpoint directory.
    Raises:
        CheckpointWriteError: the disk filled up (the message names the last checkpoint,
            which is intact; nothing of the new one is left behind).
    """
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
    finite = weights_finite(weights)
    try:
        with atomic.replacing(final, marker=META_FILE) as tmp:
            files = _write_files(tmp, weights, optimizer_state)
            record = {"format": FORMAT, "version": VERSION, **meta, "step": step, "weights_finite": finite,
                      "files": files}
            (tmp / META_FILE).write_text(json.dumps(record, indent=2) + "\n")
            atomic.fsync(tmp / META_FILE)
    except Exception as exc:
        if not _is_disk_full(exc):
            raise
        intact = [p for p in existing if _recorded_finite(p)]
        kept = (f"the last checkpoint, step {_step_of(intact[-1])}, is intact ({intact[-1]})" if intact
                else "no earlier checkpoint was lost")
        raise CheckpointWriteError(f"no space left on the device holding {out} while saving step {step}; {kept}. "
                                   "Free some space and try again") from exc
    kept = [p for p in existing if _step_of(p) < step] + [final]
    # The newest checkpoint with finite weights is never pruned, whatever keep_last says.
    good = [p for p in kept if (finite if p == final else _recorded_finite(p))]
    protected = good[-1] if good else None
    for old in kept[:-keep_last]:
        if old != protected:
            shutil.rmtree(old)
    return final


def weights_finite(weights: dict[str, torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite (no NaN, no infinity)."""
    return all(bool(torch.isfinite(t).all()) for t in weights.values() if t.is_floating_point())


def _write_files(directory: Path, weights: dict[str, torch.Tensor], optimizer_state: Optional[dict[str, Any]]) -> dict:
    """Write the weights and ``state.pt`` into ``directory``; their sizes and checksums."""
    from safetensors.torch import save_file

    save_file({name: t.detach().contiguous().cpu() for name, t in weights.items()}, str(directory / WEIGHTS_FILE))
    # Through a Python file, so that a failed write (a full disk) surfaces as its OSError.
    with open(directory / STATE_FILE, "wb") as f:
        torch.save({"optimizer": optimizer_state, "rng": rng_state()}, f)
    files = {}
    for name in (WEIGHTS_FILE, STATE_FILE):
        atomic.fsync(directory / name)
        files[name] = {"bytes": (directory / name).stat().st_size, "sha256": atomic.sha256(directory / name)}
    return files


def _is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a full disk or an exhausted quota;
    safetensors reports the OS error in its message only, torch.save as the context of its own."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if f"(os error {errno.ENOSPC})" in str(exc) or f"(os error {errno.EDQUOT})" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _recorded_finite(path: Path) -> bool:
    """Whether a checkpoint's ``meta.json`` does not record non-finite weights (checkpoints
    from before the record count as finite; a damaged record as not)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("weights_finite", True) is True


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


def open_checkpoint(path: PathLike, validate: Optional[Callable[[Checkpoint], None]] = None) -> Checkpoint:
    """Open a checkpoint directory, or a run directory's newest good checkpoint: every file
    present, of the recorded size and checksum, ``meta.json`` a well-formed record, the
    weights finite, and ``validate(checkpoint)`` (when given: e.g. that the stored
    configuration is usable) raising no :class:`CheckpointError`.

    A checkpoint named directly must be good. In a run directory, newer checkpoints that are
    not are skipped with a warning naming them (the run goes on from the newest good one).

    Raises:
        CheckpointError: a named checkpoint that is missing a file, truncated or damaged
            (naming the file), or holds non-finite weights; a run directory with no
            checkpoint, or no good one.
    """
    path = Path(path)
    if path.is_dir() and _NAME.match(path.name):
        return _verified(path, validate)
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise CheckpointError(f"no checkpoint in {path} (expected {path}/ckpt_NNNNNNNN/ or a checkpoint directory)")
    failures = []
    for candidate in reversed(checkpoints):
        try:
            checkpoint = _verified(candidate, validate)
        except CheckpointError as exc:
            failures.append(str(exc))
            continue
        for failure in failures:
            warnings.warn(f"skipping a newer checkpoint: {failure}; using {checkpoint.path}", stacklevel=2)
        return checkpoint
    raise CheckpointError(f"no checkpoint in {path} verifies: " + "; ".join(failures))


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta: Any) -> Optional[str]:
    """What is wrong with a parsed ``meta.json`` (a wrong type, a missing key), or None."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return f"{META_FILE} is not a fusedgpt checkpoint record"
    if not _is_count(meta.get("step")):
        return f"{META_FILE} 'step' must be a non-negative integer, got {meta.get('step')!r}"
    files = meta.get("files")
    if not isinstance(files, dict):
        return f"{META_FILE} 'files' must be an object, got {files!r}"
    for name in (WEIGHTS_FILE, STATE_FILE):
        entry = files.get(name)
        if entry is not None and not (isinstance(entry, dict) and _is_count(entry.get("bytes"))
                                      and isinstance(entry.get("sha256"), str)):
            return f"{META_FILE} 'files' entry {name!r} must be {{'bytes': int, 'sha256': str}}, got {entry!r}"
    for key, kinds in (("weights_finite", (bool,)), ("model", (dict,)), ("train", (dict,)), ("data", (dict,)),
                       ("tokenizer", (str, type(None))), ("task", (str,))):
        if key in meta and not isinstance(meta[key], kinds):
            return f"{META_FILE} {key!r} has the wrong type ({type(meta[key]).__name__})"
    return None


def _file_weights_finite(path: Path) -> bool:
    from safetensors.torch import load_file

    return weights_finite(load_file(path))


def _verified(path: Path, validate: Optional[Callable[[Checkpoint], None]] = None) -> Checkpoint:
    """``path``'s checkpoint once every file matches its record in ``meta.json`` and the
    checks of :func:`open_checkpoint` pass."""
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path} is damaged: cannot read {META_FILE} ({exc})") from exc
    if isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}; this fusedgpt reads {VERSION}")
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    for name in (WEIGHTS_FILE, STATE_FILE):
        expected = meta["files"].get(name)
        file = path / name
        if expected is None or not file.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} has {size} bytes, expected {expected['bytes']} (truncated?)")
        if atomic.sha256(file) != expected["sha256"]:
            raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match its recorded sha256")
    # Recorded since the record has existed; read from the weights for older checkpoints.
    finite = meta["weights_finite"] if "weights_finite" in meta else _file_weights_finite(path / WEIGHTS_FILE)
    if not finite:
        raise CheckpointError(f"checkpoint {path} holds non-finite weights (NaN or infinity: the run had diverged)")
    checkpoint = Checkpoint(path, meta)
    if validate is not None:
        validate(checkpoint)
    return checkpoint
