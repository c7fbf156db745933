"""The message-passing network of the published QM9 protocol, in pure PyTorch (no PyTorch Geometric).

Architecture (Nash-MTL's ``experiments/quantum_chemistry/models.py``, reused by FAMO; both adapt PyG's
``qm9_nn_conv`` example after Gilmer et al., ICML 2017)::

    h⁰ = ReLU(Linear(11 → 64)(x))
    W_e = reshape(Linear(128 → 64·64)(ReLU(Linear(5 → 128)(e_ij))))          edge network
    3 × { m = ReLU(NNConv(h, W)) ; h = GRU(m, h) }                              shared weights
    NNConv(h)_i = h_i Θ + mean_{j → i} h_j W_{ji} + b                           aggr="mean"
    g = Set2Set(h, 3 steps)  (128)
    features = ReLU(Linear(128 → 64)(g))                                        shared representation
    prediction_t = Linear(64 → 1)(features)                                     one head per task

The trunk (``lin0``, the convolution with its edge network, the GRU, Set2Set and ``lin1``) is what Nash-MTL
calls the shared parameters; ``features`` is its ``representation`` for feature-level methods.

**Our choice (speed, same function):** PyG's ``NNConv`` evaluates the edge network at each of the three
message-passing steps; the edge attributes and its weights do not change between steps, so
:class:`MessagePassingTrunk` evaluates it once per forward and reuses ``W`` (the outputs and gradients are
the same up to floating-point summation order). The edge network dominates the cost: about
``2 · E · 128 · 4096`` multiply-adds per evaluation for ``E`` edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.tasks import Task
from .base import MultiTaskModel

__all__ = ["EdgeConditionedConv", "Set2Set", "MessagePassingTrunk", "mpnn"]


class EdgeConditionedConv(nn.Module):
    """NNConv (Gilmer et al. 2017, eq. for the edge network; PyG's ``NNConv`` with ``aggr="mean"``).

    ``out_i = x_i Θ + mean_{(j → i) ∈ E} x_j W(e_ji) + b`` with ``W(e) = reshape(edge_network(e))``.
    Parameters: ``edge_network`` (``Linear(edge_features → hidden) → ReLU → Linear(hidden → C·C)``), ``root``
    (``Θ``, no bias), ``bias`` (zeros at initialisation, as in PyG).
    """

    def __init__(self, channels: int = 64, edge_features: int = 5, hidden: int = 128) -> None:
        super().__init__()
        self.channels = int(channels)
        self.edge_network = nn.Sequential(
            nn.Linear(edge_features, hidden), nn.ReLU(), nn.Linear(hidden, self.channels * self.channels)
        )
        self.root = nn.Linear(self.channels, self.channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(self.channels))

    def edge_weights(self, edge_attr: Tensor) -> Tensor:
        """``W(e)`` for every edge: ``(edges, C, C)`` (input channel × output channel)."""
        return self.edge_network(edge_attr).view(-1, self.channels, self.channels)

    def forward(self, x: Tensor, edge_index: Tensor, weights: Tensor, in_degree: Tensor) -> Tensor:
        """One convolution given precomputed ``weights`` and the in-degree of every node (``(nodes, 1)``)."""
        source, target = edge_index[0], edge_index[1]
        messages = torch.bmm(x[source].unsqueeze(1), weights).squeeze(1)
        summed = torch.zeros_like(x).index_add_(0, target, messages)
        return summed / in_degree.clamp_min(1) + self.root(x) + self.bias


def _segment_softmax(scores: Tensor, segment: Tensor, segments: int) -> Tensor:
    """Softmax of ``scores (n,)`` within each segment (graph); stable (per-segment max subtracted)."""
    maximum = torch.full((segments,), float("-inf"), dtype=scores.dtype, device=scores.device)
    maximum = maximum.scatter_reduce(0, segment, scores, reduce="amax", include_self=True)
    exp = (scores - maximum[segment]).exp()
    total = torch.zeros(segments, dtype=scores.dtype, device=scores.device).index_add_(0, segment, exp)
    return exp / total[segment]


class Set2Set(nn.Module):
    """Set2Set readout (Vinyals et al., ICLR 2016), as in PyG: an LSTM over ``steps`` attention steps.

    ``q_t = LSTM(q*_{t−1})``, ``a_i = softmax_{i ∈ graph}(x_i · q_t)``, ``r_t = Σ_i a_i x_i``,
    ``q*_t = [q_t, r_t]``; returns ``q*_steps`` of shape ``(graphs, 2C)``.
    """

    def __init__(self, channels: int, steps: int = 3) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"Set2Set needs at least one step, got {steps}")
        self.channels = int(channels)
        self.steps = int(steps)
        self.lstm = nn.LSTM(2 * self.channels, self.channels)

    def forward(self, x: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        state = (x.new_zeros(1, num_graphs, self.channels), x.new_zeros(1, num_graphs, self.channels))
        q_star = x.new_zeros(num_graphs, 2 * self.channels)
        for _ in range(self.steps):
            q, state = self.lstm(q_star.unsqueeze(0), state)
            q = q.view(num_graphs, self.channels)
            attention = _segment_softmax((x * q[batch]).sum(dim=-1), batch, num_graphs)
            readout = torch.zeros_like(q).index_add_(0, batch, attention.unsqueeze(-1) * x)
            q_star = torch.cat([q, readout], dim=-1)
        return q_star


class MessagePassingTrunk(nn.Module):
    """The shared part: ``lin0`` → 3 × (NNConv, GRU) → Set2Set → ``lin1``; input a ``GraphBatch``.

    Reads ``batch.x``, ``batch.edge_index``, ``batch.edge_attr``, ``batch.batch``, ``batch.num_graphs``
    (see :class:`taskbalance.data.qm9_graph.GraphBatch`); returns ``(graphs, channels)`` features.
    """

    def __init__(self, node_features: int = 11, edge_features: int = 5, channels: int = 64,
                 edge_hidden: int = 128, steps: int = 3, set2set_steps: int = 3) -> None:
        super().__init__()
        self.lin0 = nn.Linear(node_features, channels)
        self.conv = EdgeConditionedConv(channels, edge_features, edge_hidden)
        self.gru = nn.GRU(channels, channels)
        self.set2set = Set2Set(channels, set2set_steps)
        self.lin1 = nn.Linear(2 * channels, channels)
        self.steps = int(steps)
        self.out_features = int(channels)

    def forward(self, graphs: object) -> Tensor:
        x: Tensor = graphs.x  # type: ignore[attr-defined]
        edge_index: Tensor = graphs.edge_index  # type: ignore[attr-defined]
        batch: Tensor = graphs.batch  # type: ignore[attr-defined]
        num_graphs = int(graphs.num_graphs)  # type: ignore[attr-defined]
        out = F.relu(self.lin0(x))
        hidden = out.unsqueeze(0)
        weights = self.conv.edge_weights(graphs.edge_attr)  # type: ignore[attr-defined]
        in_degree = torch.zeros(len(x), 1, dtype=out.dtype, device=out.device).index_add_(
            0, edge_index[1], torch.ones(edge_index.shape[1], 1, dtype=out.dtype, device=out.device)
        )
        for _ in range(self.steps):
            messages = F.relu(self.conv(out, edge_index, weights, in_degree))
            out, hidden = self.gru(messages.unsqueeze(0), hidden)
            out = out.squeeze(0)
        return F.relu(self.lin1(self.set2set(out, batch, num_graphs)))


def mpnn(tasks: Sequence[Task], node_features: int = 11, edge_features: int = 5, channels: int = 64,
         edge_hidden: int = 128, steps: int = 3, set2set_steps: int = 3) -> MultiTaskModel:
    """The published QM9 network: :class:`MessagePassingTrunk` and one ``Linear(channels → output)`` head
    per task (Nash-MTL's ``head_i``), as a :class:`~taskbalance.models.base.MultiTaskModel`."""
    trunk = MessagePassingTrunk(node_features, edge_features, channels, edge_hidden, steps, set2set_steps)
    heads = nn.ModuleDict({t.name: nn.Linear(channels, t.output_size) for t in tasks})
    return MultiTaskModel(tasks, trunk, heads, channels)
