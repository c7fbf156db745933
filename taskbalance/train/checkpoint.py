"""Checkpoints: atomic writes, safe reads, the run's identity, and the RNG state of a bit-for-bit resume."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "save_checkpoint", "load_checkpoint", "read_state_file", "capture_rng", "restore_rng",
    "CHECKPOINT_FORMAT",
    "CheckpointError", "CheckpointMismatchError", "set_aside", "run_identity", "check_identity",
]

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable (truncated, corrupt), not ours, or not this run's.

    ``path`` is the file. A caller that can start the run afresh catches this, moves the file aside with
    :func:`set_aside` (keeping it for inspection) and restarts.
    """

    def __init__(self, path: str | Path, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint saved by another run (method, hyperparameters, seed, protocol or tasks).

    ``differences`` maps each differing field to ``(saved, requested)``.
    """

    def __init__(self, path: str | Path, message: str, differences: Mapping[str, tuple[Any, Any]]) -> None:
        super().__init__(path, message)
        self.differences = dict(differences)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` with ``torch.save`` atomically: a temporary file in the same directory, fsync, rename.

    A reader (or a resumed run after a crash) sees either the previous checkpoint or the new one, never a
    partial file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as tmp:
            torch.save(state, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def read_state_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with a corrupt file reported as such.

    Raises:
        CheckpointError: the file cannot be read (truncated, corrupt, unreadable); the message names it and
            the fix. A missing file raises ``FileNotFoundError`` as usual.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # zip/pickle/EOF/OS errors of a truncated or corrupt file all land here
        raise CheckpointError(
            path, f"checkpoint {path} is unreadable (truncated or corrupt: {type(error).__name__}: "
            f"{_first_line(error)}); move it aside or delete it to start the run afresh"
        ) from error


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no arbitrary unpickling) onto the CPU.

    Raises:
        CheckpointError: the file cannot be read (truncated, corrupt, unreadable) or is not a taskbalance
            checkpoint; the message names the file. A missing file raises ``FileNotFoundError`` as usual.
    """
    path = Path(path)
    state = read_state_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, f"{path} is not a taskbalance checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def set_aside(path: str | Path) -> Path:
    """Move an unusable checkpoint to ``<name>.corrupt`` (``.corrupt.1``, … if taken); return the new path.

    The file is kept for inspection; the run can then start afresh at the original path.
    """
    source = Path(path)
    target = source.with_name(source.name + ".corrupt")
    number = 0
    while target.exists():
        number += 1
        target = source.with_name(f"{source.name}.corrupt.{number}")
    os.replace(source, target)
    return target


def run_identity(method: str, seed: int, **more: Any) -> dict[str, Any]:
    """What makes a run this run, in the JSON-able form saved in its checkpoint: method, seed and ``more``
    (hyperparameters, dataset, architecture…). Tuples become lists, keys are sorted."""
    identity = {"method": method, "seed": seed, **more}
    normalised: dict[str, Any] = json.loads(json.dumps(identity, sort_keys=True, default=str))
    return normalised


def check_identity(path: str | Path, saved: Mapping[str, Any] | None, requested: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` unless the checkpoint's saved identity is ``requested``."""
    if saved is None:
        raise CheckpointMismatchError(
            path, f"checkpoint {path} was written without its run's identity (an older taskbalance), so it "
            "cannot be checked against this run; move it aside or delete it to start afresh",
            {"identity": (None, dict(requested))},
        )
    fields = sorted(set(saved) | set(requested))
    differences = {k: (saved.get(k), requested.get(k)) for k in fields if saved.get(k) != requested.get(k)}
    if differences:
        described = "; ".join(
            f"{k}: saved {_show(old)}, this run {_show(new)}" for k, (old, new) in differences.items()
        )
        raise CheckpointMismatchError(
            path, f"checkpoint {path} belongs to another run ({described}); refusing to resume. Use another "
            "checkpoint path, or start afresh without resuming",
            differences,
        )


def _show(value: Any) -> str:
    return "(none)" if value is None else json.dumps(value, sort_keys=True)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """The data-order generator's state and torch's global RNG states (CPU, and CUDA when present)."""
    state: dict[str, Any] = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(generator: torch.Generator, state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
