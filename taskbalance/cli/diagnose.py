"""``taskbalance diagnose DATASET``: task affinity and gradient conflict (see
:mod:`taskbalance.diagnostics.cli_diagnose`, where the command function lives)."""

from __future__ import annotations

from ..diagnostics.cli_diagnose import diagnose as diagnose_command

__all__ = ["diagnose_command"]
