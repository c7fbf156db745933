"""``build_model(data, arch)``: a multi-task model whose heads fit the dataset's tasks."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..data.base import MultiTaskData
from .base import MultiTaskModel, make_head
from .cross_stitch import CrossStitch
from .dselect_k import DSelectK
from .mmoe import MMoE
from .ple import PLE
from .tiny import TinyModel
from .trunks import ConvTrunk, MLPTrunk

__all__ = ["build_model", "ARCHITECTURES"]

ARCHITECTURES = (
    "auto", "mlp", "cnn", "qm9", "mmoe", "mpnn", "tiny", "cross-stitch", "cgc", "ple", "dselect-k"
)
_DEFAULT_ARCH = {"qm9": "qm9", "qm9_graph": "mpnn", "tiny": "tiny"}
"""``arch="auto"`` by dataset name (``cnn`` for image inputs, ``mlp`` for the rest)."""
_MODEL_CLASSES = {"tiny": TinyModel}
"""Architectures that are one model class taking ``(data, **options)`` (options: the class's ``DEFAULTS``)."""
_EXPERTS: dict[str, Any] = {"expert_hidden": (64,), "expert_size": 32, "head_hidden": (), "act": "relu"}
_FLAT_MODELS: dict[str, tuple[Any, dict[str, Any]]] = {
    "cross-stitch": (CrossStitch, {"hidden": (64, 64), "head_hidden": (), "act": "relu"}),
    "cgc": (PLE, {"levels": 1, "task_experts": 1, "shared_experts": 2, **_EXPERTS}),
    "ple": (PLE, {"levels": 2, "task_experts": 1, "shared_experts": 2, **_EXPERTS}),
    "dselect-k": (DSelectK, {"num_experts": 8, "k": 2, "gamma": 1.0, **_EXPERTS}),
}
"""Expert and multi-column architectures over flat inputs: ``(class, default options)``."""


def _hard_sharing(
    data: MultiTaskData, trunk: nn.Module, feature_size: int, head_hidden: Sequence[int], act: str
) -> MultiTaskModel:
    heads = nn.ModuleDict({t.name: make_head(t, feature_size, head_hidden, act) for t in data.tasks})
    return MultiTaskModel(data.tasks, trunk, heads, feature_size)


def _graph_feature_sizes(data: MultiTaskData) -> tuple[int, int]:
    graphs = getattr(data.train, "graphs", None)
    if graphs is None:
        raise ValueError(f"arch='mpnn' needs a graph dataset (e.g. 'qm9_graph'); {data.name!r} has none")
    probe = graphs.batch(data.train.x[:1])
    return int(probe.x.shape[1]), int(probe.edge_attr.shape[1])


def build_model(data: MultiTaskData, arch: str = "auto", **options: Any) -> MultiTaskModel:
    """Build a multi-task model for ``data``: a trunk for its inputs, one head per task (``output_size``).

    Architectures (``options`` in brackets, defaults shown):

    * ``"mlp"`` — hard sharing, MLP trunk over flattened inputs
      (``hidden=(256, 256)``, ``act="relu"``, ``dropout=0.0``, ``head_hidden=()``);
    * ``"qm9"`` — the MLP of the QM9 probe (``docs/method-notes.md`` §8): 3 × 256, SiLU, linear heads
      (same options);
    * ``"cnn"`` — hard sharing, the LeNet-style trunk of Sener & Koltun 2018 for images
      (``channels=(10, 20)``, ``out_features=50``, ``head_hidden=(50,)``: their 50-unit task towers);
    * ``"mmoe"`` — Multi-gate Mixture-of-Experts (``num_experts=8``, ``expert_hidden=(64,)``,
      ``expert_size=32``, ``head_hidden=()``, ``act="relu"``); see :mod:`taskbalance.models.mmoe` for
      which parameters to pass as ``shared=``;
    * ``"mpnn"`` — the message-passing network of the published QM9 protocol for graph datasets
      (``qm9_graph``): NNConv + GRU × 3 + Set2Set, linear heads (``channels=64``, ``edge_hidden=128``,
      ``steps=3``, ``set2set_steps=3``); see :mod:`taskbalance.models.mpnn`;
    * ``"cross-stitch"`` — one MLP column per task mixed by learnt cross-stitch units after every layer
      (``hidden=(64, 64)``); see :mod:`taskbalance.models.cross_stitch`;
    * ``"cgc"`` / ``"ple"`` — Customized Gate Control / Progressive Layered Extraction (``levels=1`` / ``2``,
      ``task_experts=1``, ``shared_experts=2``, ``expert_hidden=(64,)``, ``expert_size=32``); see
      :mod:`taskbalance.models.ple`;
    * ``"dselect-k"`` — MMoE with DSelect-k gates (``num_experts=8``, ``k=2``, ``gamma=1.0``, expert options
      as MMoE); see :mod:`taskbalance.models.dselect_k`;
    * ``"tiny"`` — the 2-layer tanh MLP of the ``tiny`` test dataset (``width=16``, ``dropout=0.0``);
    * ``"auto"`` — ``cnn`` for image inputs ``(C, H, W)``, ``qm9`` for the ``qm9`` dataset, ``mpnn`` for
      ``qm9_graph``, ``tiny`` for ``tiny``, ``mlp`` otherwise.

    Seed the global RNG (``torch.manual_seed``) before calling for reproducible initial weights.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    shape = data.input_shape
    if arch == "auto":
        arch = "cnn" if len(shape) == 3 else _DEFAULT_ARCH.get(data.name, "mlp")
    in_features = math.prod(shape)
    opts = dict(options)

    def take(allowed: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(opts) - set(allowed))
        if unknown:
            raise TypeError(
                f"build_model(arch={arch!r}) got unknown option(s) {unknown}; accepted: {sorted(allowed)}"
            )
        return {**allowed, **opts}

    if arch in _FLAT_MODELS:
        model_class, model_defaults = _FLAT_MODELS[arch]
        return model_class(data.tasks, in_features, **take(model_defaults))  # type: ignore[no-any-return]
    if arch in _MODEL_CLASSES:
        return _MODEL_CLASSES[arch](data, **take(_MODEL_CLASSES[arch].DEFAULTS))
    if arch in ("mlp", "qm9"):
        defaults: dict[str, Any] = (
            {"hidden": (256, 256, 256), "act": "silu", "dropout": 0.0, "head_hidden": ()}
            if arch == "qm9"
            else {"hidden": (256, 256), "act": "relu", "dropout": 0.0, "head_hidden": ()}
        )
        o = take(defaults)
        trunk = MLPTrunk(in_features, o["hidden"], act=o["act"], dropout=o["dropout"])
        return _hard_sharing(data, trunk, trunk.out_features, o["head_hidden"], o["act"])
    if arch == "mpnn":
        from .mpnn import mpnn

        o = take({"channels": 64, "edge_hidden": 128, "steps": 3, "set2set_steps": 3})
        node_features, edge_features = _graph_feature_sizes(data)
        return mpnn(data.tasks, node_features, edge_features, **o)
    if arch == "cnn":
        if len(shape) != 3:
            raise ValueError(
                f"arch='cnn' needs image inputs (C, H, W); {data.name!r} has input shape {shape}"
            )
        o = take({"channels": (10, 20), "out_features": 50, "head_hidden": (50,)})
        conv = ConvTrunk(shape, o["channels"], o["out_features"])
        return _hard_sharing(data, conv, conv.out_features, o["head_hidden"], "relu")
    o = take({"num_experts": 8, "expert_hidden": (64,), "expert_size": 32, "head_hidden": (), "act": "relu"})
    return MMoE(data.tasks, in_features, **o)
