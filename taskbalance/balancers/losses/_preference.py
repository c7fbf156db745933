"""The preference vector shared by the preference scalarisations (PBI, COSMOS)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["PreferenceInput", "preference_vector"]

PreferenceInput = Sequence[float] | Mapping[str, float] | None


def preference_vector(preference: PreferenceInput, tasks: Sequence[str], method: str) -> Tensor:
    """``(K,)`` float64 preference in task order: uniform ``1/K`` when ``None``; a mapping is keyed by task.

    Entries must be finite and ``>= 0`` with a positive sum; a mapping must name every task exactly.
    """
    if preference is None:
        return torch.full((len(tasks),), 1.0 / len(tasks), dtype=torch.float64)
    if isinstance(preference, Mapping):
        unknown = sorted(set(preference) - set(tasks))
        missing = [t for t in tasks if t not in preference]
        if unknown or missing:
            raise ValueError(
                f"{method}: preference must give one value per task; unknown {unknown}, missing {missing}"
            )
        values = [float(preference[t]) for t in tasks]
    else:
        values = [float(v) for v in preference]
        if len(values) != len(tasks):
            raise ValueError(
                f"{method}: preference has {len(values)} entries for {len(tasks)} tasks {list(tasks)}"
            )
    if not all(math.isfinite(v) and v >= 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"{method}: preference entries must be finite, >= 0 and not all 0; got {values}")
    return torch.tensor(values, dtype=torch.float64)
