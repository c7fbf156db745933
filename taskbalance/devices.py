"""Checking a user's ``--device`` before anything runs: one clear line instead of a CUDA traceback later."""

from __future__ import annotations

import torch

__all__ = ["device_problem"]


def device_problem(device: str) -> str | None:
    """What is wrong with ``device`` here (one line naming the fix), or ``None`` if it is usable."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        return f"device {device!r} is not a torch device; use cpu, cuda or cuda:N ({error})"
    if parsed.type == "cpu":
        return None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return (
                f"device {device!r} is not available: torch finds no CUDA GPU on this machine "
                f"(torch {torch.__version__}); run on a machine with a GPU or use --device cpu"
            )
        if parsed.index is not None and parsed.index >= count:
            return f"device {device!r} is not available: this machine has {count} CUDA GPU(s)"
        return None
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return None
    return f"device {device!r} is not available on this machine; use cpu or cuda"
