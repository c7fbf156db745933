"""The published QM9 network: equal to an explicit-loop reference and to PyTorch Geometric's layers."""

from __future__ import annotations

import math

import pytest
import torch
from molecules import MOLECULES, padded
from torch import Tensor

from taskbalance.data.qm9 import QM9_TASKS
from taskbalance.data.qm9_graph import GraphBatch, build_molecule_graphs
from taskbalance.models.mpnn import MessagePassingTrunk, mpnn

NAMES = list(MOLECULES)


def _batch(names: list[str]) -> GraphBatch:
    charges, positions = padded(names)
    graphs, _ = build_molecule_graphs(charges, positions)
    return graphs.batch(torch.arange(len(names)))


def _trunk(seed: int = 0) -> MessagePassingTrunk:
    torch.manual_seed(seed)
    trunk = MessagePassingTrunk().double()
    with torch.no_grad():  # a non-zero bias, so that a forgotten bias would show
        trunk.conv.bias.normal_(0, 0.1)
    return trunk


def _reference_trunk(trunk: MessagePassingTrunk, batch: GraphBatch) -> Tensor:
    """The same function written edge by edge and graph by graph, with GRU and LSTM cells spelled out."""
    c = trunk.out_features

    def gru_cell(x: Tensor, h: Tensor) -> Tensor:  # PyTorch's GRU equations, gates r, z, n
        w_ih, w_hh = trunk.gru.weight_ih_l0, trunk.gru.weight_hh_l0
        b_ih, b_hh = trunk.gru.bias_ih_l0, trunk.gru.bias_hh_l0
        gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
        r = torch.sigmoid(gi[:c] + gh[:c])
        z = torch.sigmoid(gi[c : 2 * c] + gh[c : 2 * c])
        n = torch.tanh(gi[2 * c :] + r * gh[2 * c :])
        return (1 - z) * n + z * h

    def lstm_cell(x: Tensor, h: Tensor, cell: Tensor) -> tuple[Tensor, Tensor]:  # gates i, f, g, o
        lstm = trunk.set2set.lstm
        g = lstm.weight_ih_l0 @ x + lstm.bias_ih_l0 + lstm.weight_hh_l0 @ h + lstm.bias_hh_l0
        i, f = torch.sigmoid(g[:c]), torch.sigmoid(g[c : 2 * c])
        cand, o = torch.tanh(g[2 * c : 3 * c]), torch.sigmoid(g[3 * c :])
        cell = f * cell + i * cand
        return o * torch.tanh(cell), cell

    conv = trunk.conv
    nodes = batch.x.shape[0]
    h = [torch.relu(trunk.lin0.weight @ batch.x[v] + trunk.lin0.bias) for v in range(nodes)]
    memory = list(h)
    edges = batch.edge_index.t().tolist()
    for _ in range(3):
        new = []
        for v in range(nodes):
            incoming = [(e, s) for e, (s, t) in enumerate(edges) if t == v]
            total = torch.zeros(c, dtype=torch.float64)
            for e, s in incoming:
                layer1, layer2 = conv.edge_network[0], conv.edge_network[2]
                first = torch.relu(layer1.weight @ batch.edge_attr[e] + layer1.bias)
                w = (layer2.weight @ first + layer2.bias).reshape(c, c)
                total = total + h[s] @ w
            mean = total / max(len(incoming), 1)
            message = torch.relu(mean + conv.root.weight @ h[v] + conv.bias)
            new.append(gru_cell(message, memory[v]))
        h = memory = new
    outputs = []
    for g in range(batch.num_graphs):
        members = [v for v in range(nodes) if int(batch.batch[v]) == g]
        q_star = torch.zeros(2 * c, dtype=torch.float64)
        state = (torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64))
        for _ in range(3):
            q, cell = lstm_cell(q_star, *state)
            state = (q, cell)
            scores = [float(h[v] @ q) for v in members]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            readout = sum(w / sum(weights) * h[v] for w, v in zip(weights, members, strict=True))
            q_star = torch.cat([q, readout])  # type: ignore[list-item]
        outputs.append(torch.relu(trunk.lin1.weight @ q_star + trunk.lin1.bias))
    return torch.stack(outputs)


def _double(batch: GraphBatch) -> GraphBatch:
    return GraphBatch(
        batch.x.double(), batch.edge_index, batch.edge_attr.double(), batch.batch, batch.num_graphs
    )


def test_trunk_equals_an_edge_by_edge_and_graph_by_graph_reference() -> None:
    batch = _double(_batch(["water", "hydrogen_cyanide", "formaldehyde"]))
    trunk = _trunk()
    with torch.no_grad():
        ours = trunk(batch)
        reference = _reference_trunk(trunk, batch)
    assert ours.shape == (3, 64)
    assert torch.allclose(ours, reference, atol=1e-10)


def test_trunk_equals_pyg_nnconv_gru_set2set() -> None:
    pyg = pytest.importorskip("torch_geometric.nn")
    batch = _double(_batch(NAMES))
    trunk = _trunk(1)
    edge_network = torch.nn.Sequential(
        torch.nn.Linear(5, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64 * 64)
    ).double()
    conv = pyg.NNConv(64, 64, edge_network, aggr="mean").double()
    set2set = pyg.Set2Set(64, processing_steps=3).double()
    gru = torch.nn.GRU(64, 64).double()
    with torch.no_grad():
        edge_network.load_state_dict(trunk.conv.edge_network.state_dict())
        conv.lin.weight.copy_(trunk.conv.root.weight)
        conv.bias.copy_(trunk.conv.bias)
        set2set.lstm.load_state_dict(trunk.set2set.lstm.state_dict())
        gru.load_state_dict(trunk.gru.state_dict())
        # Nash-MTL's Net.forward, with PyG's layers
        out = torch.relu(trunk.lin0(batch.x))
        h = out.unsqueeze(0)
        for _ in range(3):
            m = torch.relu(conv(out, batch.edge_index, batch.edge_attr))
            out, h = gru(m.unsqueeze(0), h)
            out = out.squeeze(0)
        expected = torch.relu(trunk.lin1(set2set(out, batch.batch)))
        ours = trunk(batch)
    assert torch.allclose(ours, expected, atol=1e-10)


def test_outputs_do_not_depend_on_batch_composition_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    model = mpnn(QM9_TASKS)
    together = _batch(NAMES)
    _, predictions = model(together)
    alone = {name: model(_batch([name]))[1] for name in ("benzene", "water")}
    for name, single in alone.items():
        row = NAMES.index(name)
        for task in QM9_TASKS:
            assert torch.allclose(predictions[task.name][row], single[task.name][0], atol=1e-5)
    assert set(predictions) == {t.name for t in QM9_TASKS} and predictions["mu"].shape == (len(NAMES),)
    sum(p.sum() for p in predictions.values()).backward()
    silent = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert silent == []


def test_trunk_is_invariant_to_rotation_and_atom_order() -> None:
    charges, positions = padded(["formaldehyde"])
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    perm = torch.tensor([2, 0, 3, 1])
    moved_c, moved_p = charges.clone(), positions.clone()
    moved_c[0, :4], moved_p[0, :4] = charges[0, :4][perm], (positions[0, :4] @ q.T + 1.5)[perm]
    trunk = _trunk().float()
    a = trunk(build_molecule_graphs(charges, positions)[0].batch(torch.tensor([0])))
    b = trunk(build_molecule_graphs(moved_c, moved_p)[0].batch(torch.tensor([0])))
    assert torch.allclose(a, b, atol=1e-5)


def test_build_model_registers_mpnn_by_name() -> None:
    from taskbalance.models import ARCHITECTURES

    assert "mpnn" in ARCHITECTURES
