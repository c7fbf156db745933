"""Per-task, per-parameter state (``K × P``: DB-MTL's EMA, MoCo's tracked gradients, ExcessMTL's sums).

The width ``P`` is known only once the shared parameters are seen, so such state starts ``K × 0`` and is sized
at the first step by :func:`sized_to` from the method's ``_prepare`` hook (after the inputs are validated,
before the GradScaler guard snapshots the buffers); a checkpoint's shape is adopted by :func:`adopt_shape`
from ``_prepare_load``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["sized_to", "adopt_shape"]


def sized_to(state: Tensor, jacobian: Tensor, method: str, dtype: torch.dtype | None = None) -> Tensor:
    """``state`` if its width is the Jacobian's; a zero ``K × P`` tensor if it is still ``K × 0``.

    Raises:
        ValueError: the width changed between steps (other shared parameters were passed).
    """
    width = jacobian.shape[1]
    if state.shape[1] == width:
        return state
    if state.shape[1] != 0:
        raise ValueError(
            f"{method}: the shared gradient has {width} entries but the state was built for "
            f"{state.shape[1]}; pass the same shared parameters every step"
        )
    return jacobian.new_zeros(state.shape[0], width, dtype=dtype or state.dtype)


def adopt_shape(state: Tensor, state_dict: Mapping[str, Any], key: str) -> Tensor:
    """``state``, re-sized (zeros) to the saved entry's shape so ``load_state_dict`` can copy into it."""
    saved = state_dict.get(key)
    if isinstance(saved, Tensor) and saved.shape != state.shape:
        return state.new_zeros(saved.shape)
    return state
