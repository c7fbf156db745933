"""Checks that a saved balancer state fits the balancer it is loaded into, before anything is copied.

``Balancer.state_dict()`` records the method name and the task list (in ``_extra_state``); loading checks
them, the finiteness of every saved number, and (``strict=True``) that the saved entries are the balancer's
own with the same shapes. A refused state raises :class:`~taskbalance.TaskError` saying what differs and
leaves the balancer exactly as it was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import TaskError

if TYPE_CHECKING:
    from .base import Balancer

__all__ = ["check_loadable"]

_EXTRA = "_extra_state"


def check_loadable(balancer: Balancer, state_dict: Mapping[str, Any], prefix: str, *, strict: bool) -> None:
    """Raise :class:`~taskbalance.TaskError` if ``state_dict`` (entries under ``prefix``) does not fit."""
    name = balancer.info.name
    own = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    extra = own.get(_EXTRA)
    if isinstance(extra, Mapping):
        saved_method = extra.get("method")
        if saved_method is not None and saved_method != name:
            raise TaskError(_method_difference(balancer, str(saved_method), own))
        saved_tasks = extra.get("tasks")
        if saved_tasks is not None and tuple(saved_tasks) != balancer.tasks:
            raise TaskError(_task_difference(name, tuple(saved_tasks), balancer.tasks))
    for key, value in own.items():
        where = _first_nonfinite(value)
        if where is not None:
            label = key if key != _EXTRA else f"{_EXTRA}[{where}]"
            raise TaskError(
                f"the saved {name} state has NaN or inf in {label!r}: it was saved after the state was "
                "poisoned (e.g. under on_nonfinite='propagate'); resume from an earlier checkpoint"
            )
    if strict:
        _check_entries(balancer, own)


def _expected_entries(balancer: Balancer) -> dict[str, Tensor]:
    entries: dict[str, Tensor] = {n: p for n, p in balancer._parameters.items() if p is not None}
    for n, b in balancer._buffers.items():
        if b is not None and n not in balancer._non_persistent_buffers_set:
            entries[n] = b
    return entries


def _check_entries(balancer: Balancer, own: Mapping[str, Any]) -> None:
    expected = _expected_entries(balancer)
    saved = {k for k in own if "." not in k and k != _EXTRA}
    missing = sorted(set(expected) - saved)
    unexpected = sorted(saved - set(expected))
    if missing or unexpected:
        raise TaskError(
            f"the saved state does not fit this {balancer.info.name} balancer: "
            f"missing {missing or 'nothing'}, unexpected {unexpected or 'nothing'}; was it saved by another "
            "method or version?"
        )
    for key, tensor in expected.items():
        value = own[key]
        if isinstance(value, Tensor) and value.shape != tensor.shape and key not in balancer.resizable_state:
            raise TaskError(
                f"the saved {balancer.info.name} state entry {key!r} has shape {tuple(value.shape)}, this "
                f"balancer's has {tuple(tensor.shape)}: build it with the hyperparameters it was saved with"
            )


def _method_difference(balancer: Balancer, saved: str, own: Mapping[str, Any]) -> str:
    expected = set(_expected_entries(balancer))
    entries = {k for k in own if "." not in k and k != _EXTRA}
    only_saved = sorted(entries - expected)
    only_here = sorted(expected - entries)
    return (
        f"this state was saved by a {saved!r} balancer and cannot be loaded into {balancer.info.name!r}; "
        f"build the balancer with taskbalance.make({saved!r}, tasks) to resume it. Entries only in the saved "
        f"state: {only_saved or 'none'}; only in this balancer: {only_here or 'none'}"
    )


def _task_difference(method: str, saved: tuple[str, ...], here: tuple[str, ...]) -> str:
    if sorted(saved) == sorted(here):
        return (
            f"the saved {method} state is for tasks {list(saved)}, this balancer has the same tasks in "
            f"another order {list(here)}: per-task state would land on the wrong task. Build the balancer "
            f"with tasks={list(saved)}"
        )
    missing = [t for t in saved if t not in here]
    added = [t for t in here if t not in saved]
    return (
        f"the saved {method} state is for tasks {list(saved)}, this balancer has {list(here)} "
        f"(saved only: {missing or 'none'}; here only: {added or 'none'}); build the balancer with the saved "
        "task list to resume it"
    )


def _first_nonfinite(value: Any, path: str = "") -> str | None:
    """The path of the first NaN/inf number in ``value`` (tensors, floats, nested containers), or ``None``."""
    if isinstance(value, Tensor):
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return path or "tensor"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "value")
    if isinstance(value, Mapping):
        for key, item in value.items():
            found = _first_nonfinite(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            found = _first_nonfinite(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None
