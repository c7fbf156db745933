"""Cross-stitch networks over MLP columns (Misra, Shrivastava, Gupta & Hebert, CVPR 2016).

One MLP column per task; after every layer a **cross-stitch unit** mixes the columns' activations with a
learnt ``K × K`` matrix ``α`` (paper Eq. 1, generalised from two tasks to ``K``)::

    h̃_k = Σ_j α_kj h_j

so task ``k``'s next layer reads a learnt combination of every column. Initialisation (paper §4.1, "α_S =
0.9, α_D = 0.1" for two tasks): ``α_kk = 0.9``, ``α_kj = 0.1 / (K − 1)`` (rows sum to 1; our generalisation
to ``K`` tasks). Defaults (our choice): columns ``hidden = (64, 64)``, ReLU; linear heads.

**With a balancer.** Every column reaches every task through the stitches, so the whole ``.trunk`` (columns
and ``α``) is shared: :meth:`shared_parameters` is ``trunk.parameters()``. ``features`` returned by
``forward`` are the columns' last-layer outputs **before** the last cross-stitch unit, stacked ``(B, K, D)``:
every task reads every column there, so per-task gradients w.r.t. them are meaningful for
``gradients="features"`` (after the stitch each task would read only its own row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..data.tasks import Task
from .base import MultiTaskModel, activation, make_head

__all__ = ["CrossStitch"]


class _Stitch(nn.Module):
    """A ``K × K`` cross-stitch unit applied to ``(B, K, D)`` column activations."""

    def __init__(self, k: int, self_weight: float = 0.9) -> None:
        super().__init__()
        other = (1.0 - self_weight) / (k - 1) if k > 1 else 0.0
        alpha = torch.full((k, k), other)
        alpha.fill_diagonal_(self_weight if k > 1 else 1.0)
        self.alpha = nn.Parameter(alpha)

    def forward(self, columns: Tensor) -> Tensor:
        return torch.einsum("kj,bjd->bkd", self.alpha, columns)


class _Columns(nn.Module):
    """``K`` MLP columns evaluated layer by layer with a stitch after each layer."""

    def __init__(self, k: int, in_features: int, hidden: Sequence[int], act: str) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("cross-stitch needs at least one hidden layer")
        widths = [in_features, *(int(w) for w in hidden)]
        self.layers = nn.ModuleList(
            nn.ModuleList(nn.Linear(widths[i], widths[i + 1]) for _ in range(k)) for i in range(len(hidden))
        )
        self.stitches = nn.ModuleList(_Stitch(k) for _ in hidden)
        self.act = activation(act)
        self.num_columns = k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(last columns before the last stitch, after it)``, both ``(B, K, D)``."""
        columns = x.unsqueeze(1).expand(-1, self.num_columns, -1)
        before = columns
        for layer, stitch in zip(self.layers, self.stitches, strict=True):
            assert isinstance(layer, nn.ModuleList)
            before = torch.stack([self.act(lin(columns[:, i])) for i, lin in enumerate(layer)], dim=1)
            columns = stitch(before)
        return before, columns


class CrossStitch(MultiTaskModel):
    """Cross-stitch MLP over flat inputs; see the module docstring."""

    def __init__(
        self,
        tasks: Sequence[Task],
        in_features: int,
        *,
        hidden: Sequence[int] = (64, 64),
        head_hidden: Sequence[int] = (),
        act: str = "relu",
    ) -> None:
        width = int(hidden[-1]) if hidden else in_features
        trunk = _Columns(len(tasks), in_features, hidden, act)
        heads = nn.ModuleDict({t.name: make_head(t, width, head_hidden, act) for t in tasks})
        super().__init__(tasks, trunk, heads, width)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        before, after = self.trunk(x.flatten(1))
        predictions: dict[str, Tensor] = {}
        for index, task in enumerate(self.tasks):
            prediction = self.heads[task.name](after[:, index])
            predictions[task.name] = prediction.squeeze(-1) if task.output_size == 1 else prediction
        return before, predictions
