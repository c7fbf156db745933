"""The one canonical key of a run, shared by specs, the store, summaries and reports.

A run is identified by ``(dataset, protocol hash, method, hyperparameters as canonical JSON, seed)``: the
store's UNIQUE key. :func:`canonical_json` is the only serialisation of hyperparameters used for keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["RunKey", "canonical_json", "run_key"]

RunKey = tuple[str, str, str, str, int]
"""``(dataset, protocol_hash, method, hyperparameters JSON, seed)``."""


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no whitespace: equal values give equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def run_key(
    dataset: str, protocol_hash: str, method: str, hyperparameters: Mapping[str, Any], seed: int
) -> RunKey:
    """The key of a run (see the module docstring)."""
    return (dataset, protocol_hash, method, canonical_json(dict(hyperparameters)), int(seed))
