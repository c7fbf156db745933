"""QM9 molecular graphs: bond perception, PyG-layout features, complete-graph collation, split and cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from molecules import MOLECULES, Z, padded
from qm9_files import _write_qm9pack_like

from taskbalance.data import load
from taskbalance.data.qm9 import qm9_arrays
from taskbalance.data.qm9_graph import (
    EDGE_FEATURES,
    NODE_FEATURES,
    GraphBatch,
    GraphSplit,
    build_molecule_graphs,
)

NAMES = list(MOLECULES)


def _orders(name: str, bonds: str = "covalent") -> dict[tuple[str, str], list[int]]:
    """Bond orders (1, 2, 3; 4 = aromatic) of one molecule, grouped by the sorted element pair."""
    charges, positions = padded([name])
    graphs, _ = build_molecule_graphs(charges, positions, bonds)  # type: ignore[arg-type]
    symbols = MOLECULES[name][0]
    out: dict[tuple[str, str], list[int]] = {}
    for (a, b), kind in zip(graphs.bonds.tolist(), graphs.bond_types.tolist(), strict=True):
        key = tuple(sorted((symbols[a], symbols[b])))
        out.setdefault(key, []).append(kind + 1)  # type: ignore[arg-type]
    return {k: sorted(v) for k, v in out.items()}


def test_covalent_rule_finds_the_textbook_bonds_and_orders() -> None:
    assert _orders("methane") == {("C", "H"): [1, 1, 1, 1]}
    assert _orders("water") == {("H", "O"): [1, 1]}
    assert _orders("acetylene") == {("C", "C"): [3], ("C", "H"): [1, 1]}
    assert _orders("hydrogen_cyanide") == {("C", "N"): [3], ("C", "H"): [1]}
    assert _orders("formaldehyde") == {("C", "O"): [2], ("C", "H"): [1, 1]}
    assert _orders("ethylene") == {("C", "C"): [2], ("C", "H"): [1, 1, 1, 1]}
    assert _orders("fluoromethane") == {("C", "F"): [1], ("C", "H"): [1, 1, 1]}
    benzene = _orders("benzene")  # a Kekulé structure: three single and three double ring bonds
    assert benzene == {("C", "C"): [1, 1, 1, 2, 2, 2], ("C", "H"): [1] * 6}


def test_rdkit_perception_agrees_on_connectivity_and_flags_aromatic_rings() -> None:
    pytest.importorskip("rdkit")
    for name in NAMES:
        covalent, rdkit = _orders(name), _orders(name, "rdkit")
        assert {k: len(v) for k, v in covalent.items()} == {k: len(v) for k, v in rdkit.items()}, name
        if name != "benzene":
            assert covalent == rdkit, name
    assert _orders("benzene", "rdkit")[("C", "C")] == [4] * 6


def test_node_features_follow_pygs_layout() -> None:
    charges, positions = padded(["formaldehyde", "acetylene", "benzene", "fluoromethane"])
    graphs, failures = build_molecule_graphs(charges, positions)
    assert failures == 0
    assert graphs.node_features.shape[1] == len(NODE_FEATURES) == 11
    column = {name: i for i, name in enumerate(NODE_FEATURES)}
    x = graphs.node_features
    carbon_of = {"formaldehyde": 0, "acetylene": 4, "benzene": 8, "fluoromethane": 20}
    # one-hot element and atomic number
    assert x[0, column["C"]] == 1 and x[0, :5].sum() == 1 and x[0, column["atomic_number"]] == 6
    assert x[1, column["O"]] == 1 and x[1, column["atomic_number"]] == 8
    # hybridisation from bond orders: C=O sp2, C#C sp, aromatic ring carbons sp2 (Kekulé), CH3F sp3
    assert x[carbon_of["formaldehyde"], column["sp2"]] == 1
    assert x[carbon_of["acetylene"], column["sp"]] == 1
    assert x[carbon_of["benzene"], column["sp2"]] == 1
    assert x[carbon_of["fluoromethane"], column["sp3"]] == 1
    assert x[carbon_of["fluoromethane"] + 1, column["sp3"]] == 1  # fluorine
    # number of bonded hydrogens; hydrogens themselves carry no hybridisation flag
    assert x[carbon_of["formaldehyde"], column["num_hs"]] == 2
    assert x[carbon_of["fluoromethane"], column["num_hs"]] == 3
    hydrogens = x[:, column["H"]] == 1
    assert torch.all(x[hydrogens][:, column["sp"]: column["sp3"] + 1] == 0)
    assert torch.all(x[:, column["aromatic"]] == 0)


def _reference_complete_graph(graphs, molecules: list[int]) -> tuple[list, list, list]:  # type: ignore[no-untyped-def]
    """Explicit loops: every ordered pair (i, j), i != j, per molecule, with its bond one-hot and distance."""
    x_rows, edges, attrs = [], [], []
    offset = 0
    for m in molecules:
        lo, hi = int(graphs.atom_ptr[m]), int(graphs.atom_ptr[m + 1])
        bond_lo, bond_hi = int(graphs.bond_ptr[m]), int(graphs.bond_ptr[m + 1])
        bond_of = {}
        for row in range(bond_lo, bond_hi):
            a, b = graphs.bonds[row].tolist()
            bond_of[(a, b)] = bond_of[(b, a)] = int(graphs.bond_types[row])
        n = hi - lo
        for i in range(n):
            x_rows.append(graphs.node_features[lo + i].tolist())
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                one_hot = [0.0] * 4
                if (i, j) in bond_of:
                    one_hot[bond_of[(i, j)]] = 1.0
                gap = graphs.positions[lo + j].numpy() - graphs.positions[lo + i].numpy()
                distance = float(np.linalg.norm(gap))
                edges.append((offset + i, offset + j))
                attrs.append(one_hot + [distance])
        offset += n
    return x_rows, edges, attrs


def test_batch_is_the_complete_graph_with_bond_one_hot_and_distance() -> None:
    charges, positions = padded(NAMES)
    graphs, _ = build_molecule_graphs(charges, positions)
    chosen = [3, 0, 7, 5]
    batch = graphs.batch(torch.tensor(chosen))
    x_rows, edges, attrs = _reference_complete_graph(graphs, chosen)
    assert isinstance(batch, GraphBatch) and batch.num_graphs == 4
    assert batch.x.tolist() == x_rows
    assert [tuple(e) for e in batch.edge_index.t().tolist()] == edges
    assert batch.edge_attr.shape[1] == len(EDGE_FEATURES)
    assert torch.allclose(batch.edge_attr, torch.tensor(attrs), atol=1e-6)
    sizes = [len(MOLECULES[NAMES[m]][0]) for m in chosen]
    assert batch.batch.tolist() == [g for g, n in enumerate(sizes) for _ in range(n)]
    # each molecule's bonds appear once per direction
    bonds = sum(int(graphs.bond_ptr[m + 1] - graphs.bond_ptr[m]) for m in chosen)
    assert int(batch.edge_attr[:, :4].sum()) == 2 * bonds


@pytest.fixture()
def fake_qm9_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TASKBALANCE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    molecules = []
    for i in range(40):
        symbols, xyz = MOLECULES[NAMES[i % len(NAMES)]]
        targets = rng.normal(0, 1, 11) + np.array([2, 70, -0.25, 0.01, 1000, 0.1, -400, -400, -400, -400, 30])
        molecules.append({"symbols": symbols, "xyz": np.array(xyz, dtype=float), "targets": targets})
    _write_qm9pack_like(tmp_path / "qm9", molecules)
    return tmp_path / "qm9"


def test_load_qm9_graph_splits_in_published_proportions_and_caches(fake_qm9_folder: Path) -> None:
    data = load("qm9_graph", subset=40, source=fake_qm9_folder)
    assert data.name == "qm9_graph"
    assert (len(data.train), len(data.val), len(data.test)) == (34, 3, 3)  # 110,831 : 10,000 : 10,000
    assert isinstance(data.train, GraphSplit)
    ids = torch.cat([data.train.x, data.val.x, data.test.x])
    assert sorted(ids.tolist()) == list(range(40))
    # targets are z-scored with training statistics; Task.scale brings MAE back to published units
    assert abs(float(data.train.y["u0"].mean())) < 1e-5
    published = qm9_arrays(fake_qm9_folder)  # the flat QM9 loader's targets, in published units
    for task in data.tasks:
        restored = data.train.y[task.name].double() * task.scale + task.offset
        assert torch.allclose(restored, published[task.name][data.train.x], rtol=1e-6, atol=1e-3), task.name
    x, y, mask = next(data.train.batches(8))
    assert isinstance(x, GraphBatch) and x.num_graphs == 8 and set(y) == set(data.task_names)
    cached = list((fake_qm9_folder.parent / "cache").glob("qm9graph_*.pt"))
    assert len(cached) == 1
    torch.load(cached[0], weights_only=True)  # plain tensors only
    again = load("qm9_graph", subset=40, source=fake_qm9_folder)
    assert torch.equal(again.train.x, data.train.x)
    assert torch.equal(again.train.graphs.node_features, data.train.graphs.node_features)  # type: ignore[union-attr]


def test_a_corrupt_cache_is_rebuilt(fake_qm9_folder: Path) -> None:
    load("qm9_graph", subset=40, source=fake_qm9_folder)
    (cached,) = (fake_qm9_folder.parent / "cache").glob("qm9graph_*.pt")
    cached.write_bytes(b"not a torch file")
    data = load("qm9_graph", subset=40, source=fake_qm9_folder)
    assert len(data.train) == 34


def test_full_split_needs_all_molecules(fake_qm9_folder: Path) -> None:
    with pytest.raises(ValueError, match="published split needs 130,831"):
        load("qm9_graph", source=fake_qm9_folder)


def test_rdkit_option_without_rdkit_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_rdkit(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name.startswith("rdkit"):
            raise ImportError("no rdkit here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_rdkit)
    charges, positions = padded(["water"])
    with pytest.raises(ModuleNotFoundError, match="pip install rdkit"):
        build_molecule_graphs(charges, positions, "rdkit")


def test_atomic_numbers_match_the_element_one_hot() -> None:
    charges, positions = padded(NAMES)
    graphs, _ = build_molecule_graphs(charges, positions)
    z_of_type = torch.tensor([Z[s] for s in ("H", "C", "N", "O", "F")], dtype=torch.float32)
    assert torch.equal(graphs.node_features[:, :5] @ z_of_type, graphs.node_features[:, 5])
