"""QM9 as molecular graphs, built offline from the coordinates and elements shipped in ``qm9pack``.

This is the input of the published QM9 protocol (Nash-MTL, Navon et al., ICML 2022, §6.2, and FAMO,
Liu et al., NeurIPS 2023, which both adapt PyTorch Geometric's ``qm9_nn_conv`` example): a message-passing
network reads each molecule as a **complete** graph (every ordered pair of distinct atoms is an edge, PyG's
``Complete`` transform) whose edge attributes are the bond type one-hot (zeros for non-bonded pairs) and the
interatomic distance in Å (PyG's ``Distance(norm=False)``).

**Node features** (11, the layout of PyG's ``QM9``, after Gilmer et al., ICML 2017): one-hot element
(H, C, N, O, F), atomic number, aromatic flag, sp / sp2 / sp3 hybridisation flags, number of bonded
hydrogens. **Bond types** (4): single, double, triple, aromatic.

**Bonds.** PyG reads bonds from the SDF file of the QM9 release through RDKit; ``qm9pack`` ships no bonds, so
they are perceived from the geometry:

* ``bonds="covalent"`` (default, no extra dependency): atoms ``i, j`` are bonded when
  ``|R_i − R_j| ≤ 1.2 (r_i + r_j)`` with Cordero et al.'s covalent radii (Dalton Trans. 2008: H 0.31,
  C 0.76, N 0.71, O 0.66, F 0.57 Å) — a common rule of thumb, **our choice** of factor. Bond orders are then
  assigned greedily (**our choice**): each atom has ``valence − degree`` free valences (H 1, C 4, N 3, O 2,
  F 1); bonds are visited from the shortest relative length ``d / (r_i + r_j)`` up and raised by one order
  while both ends have a free valence (up to triple). No bond is aromatic and no atom is aromatic (PyG's
  RDKit path reads the Kekulé SDF unsanitised, so it also reports Kekulé bond orders). Hybridisation of a
  heavy atom follows its bond orders: a triple or two double bonds → sp, one double → sp2, else sp3;
  hydrogens get no flag. PyG's unsanitised RDKit path leaves many atoms' hybridisation unspecified
  (pytorch_geometric issue #2163), so those three flags are where our features differ most from PyG's.
* ``bonds="rdkit"`` (optional, needs ``rdkit``): RDKit's ``DetermineBonds`` (xyz2mol, neutral molecule),
  then kekulisation, aromaticity and hybridisation perception (the partial sanitisation suggested in the PyG
  issue above); aromatic bonds and atoms are then flagged. A molecule RDKit cannot perceive falls back to the
  covalent rule, and the count of such molecules is stored in the dataset's protocol.

**Targets**: those of :mod:`taskbalance.data.qm9` (same order, same published units, atomisation energies).

**Cache**: the flat graph arrays and the targets are cached under :func:`~taskbalance.data.prepare.cache_dir`
as a ``.pt`` file loaded with ``weights_only=True``, keyed by the source files' sizes and modification
times and by the bond perception.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from .base import MultiTaskData, Split
from .prepare import assemble, cache_dir, split_indices, split_sizes
from .qm9 import ATOMIC_NUMBER, QM9_TASKS, _qm9pack_files, qm9_targets, read_qm9_tables

__all__ = [
    "GraphBatch",
    "GraphSplit",
    "MoleculeGraphs",
    "NODE_FEATURES",
    "EDGE_FEATURES",
    "PAPER_SPLIT",
    "covalent_bonds",
    "build_molecule_graphs",
    "load_qm9_graph",
]

BondPerception = Literal["covalent", "rdkit"]

NODE_FEATURES = ("H", "C", "N", "O", "F", "atomic_number", "aromatic", "sp", "sp2", "sp3", "num_hs")
"""Names of the 11 node features, in PyG's order."""
EDGE_FEATURES = ("single", "double", "triple", "aromatic", "distance")
"""Names of the 5 edge attributes of the complete graph (bond one-hot, then distance in Å)."""
PAPER_SPLIT = (110_831, 10_000, 10_000)
"""Train / validation / test sizes of the published protocol (Nash-MTL's and FAMO's QM9 code)."""

COVALENT_RADIUS = {1: 0.31, 6: 0.76, 7: 0.71, 8: 0.66, 9: 0.57}  # Å, Cordero et al. 2008
VALENCE = {1: 1, 6: 4, 7: 3, 8: 2, 9: 1}
BOND_FACTOR = 1.2
_TYPE_INDEX = {z: i for i, z in enumerate(ATOMIC_NUMBER.values())}  # H, C, N, O, F -> 0..4
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------ batches
@dataclass(frozen=True)
class GraphBatch:
    """A mini-batch of molecular graphs, PyG-style (nodes of all graphs stacked).

    Attributes:
        x: node features ``(nodes, 11)``.
        edge_index: ``(2, edges)``; row 0 is the source atom, row 1 the target (messages flow 0 → 1).
        edge_attr: ``(edges, 5)`` bond one-hot and distance in Å.
        batch: graph index of each node ``(nodes,)``, in ``0 .. num_graphs − 1``.
        num_graphs: number of molecules.
    """

    x: Tensor
    edge_index: Tensor
    edge_attr: Tensor
    batch: Tensor
    num_graphs: int

    def to(self, device: torch.device | str) -> GraphBatch:
        """The same batch on ``device`` (non-blocking copies)."""
        return GraphBatch(
            self.x.to(device, non_blocking=True),
            self.edge_index.to(device, non_blocking=True),
            self.edge_attr.to(device, non_blocking=True),
            self.batch.to(device, non_blocking=True),
            self.num_graphs,
        )

    def __len__(self) -> int:
        return self.num_graphs


def _segments(counts: Tensor) -> tuple[Tensor, Tensor]:
    """For segment lengths ``counts``: the segment id and the position inside its segment of every item."""
    segment = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    return segment, torch.arange(int(counts.sum())) - starts[segment]


@dataclass(frozen=True)
class MoleculeGraphs:
    """Every molecule's graph in flat arrays (molecule ``m`` owns rows ``ptr[m]:ptr[m+1]``).

    Attributes:
        atom_ptr: ``(M + 1,)`` offsets into the atom arrays.
        node_features: ``(atoms, 11)`` float32, see :data:`NODE_FEATURES`.
        positions: ``(atoms, 3)`` float32, Å.
        bond_ptr: ``(M + 1,)`` offsets into the bond arrays.
        bonds: ``(bonds, 2)`` atom indices local to their molecule, ``i < j``.
        bond_types: ``(bonds,)`` 0 single, 1 double, 2 triple, 3 aromatic.
    """

    atom_ptr: Tensor
    node_features: Tensor
    positions: Tensor
    bond_ptr: Tensor
    bonds: Tensor
    bond_types: Tensor

    def __len__(self) -> int:
        return len(self.atom_ptr) - 1

    def to_dict(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def batch(self, molecules: Tensor) -> GraphBatch:
        """Collate molecules (indices into this store) into one :class:`GraphBatch` of complete graphs.

        Vectorised (no per-molecule Python loop). Edges of each molecule are all ordered pairs ``(i, j)``,
        ``i ≠ j``, in row-major order (PyG's ``Complete``); the bond one-hot of a pair is that of the bond
        ``{i, j}`` when there is one, zeros otherwise; the last attribute is ``|R_j − R_i|``.
        """
        molecules = molecules.reshape(-1).long()
        n_atoms = self.atom_ptr[molecules + 1] - self.atom_ptr[molecules]
        graph, local = _segments(n_atoms)
        atoms = self.atom_ptr[molecules][graph] + local
        offset = torch.cumsum(n_atoms, 0) - n_atoms
        x = self.node_features[atoms]
        pos = self.positions[atoms]
        # complete graph without self loops: k-th pair of a molecule with n atoms is (k // (n-1), skip-self)
        pairs = n_atoms * (n_atoms - 1)
        edge_graph, k = _segments(pairs)
        per_row = (n_atoms - 1)[edge_graph]
        i = torch.div(k, per_row, rounding_mode="floor")
        jj = k - i * per_row
        j = jj + (jj >= i).long()
        source, target = offset[edge_graph] + i, offset[edge_graph] + j
        # bonds of these molecules, both directions, as sorted keys source * nodes + target
        n_bonds = self.bond_ptr[molecules + 1] - self.bond_ptr[molecules]
        bond_graph, bond_local = _segments(n_bonds)
        rows = self.bond_ptr[molecules][bond_graph] + bond_local
        ends = self.bonds[rows] + offset[bond_graph][:, None]
        nodes = int(n_atoms.sum())
        keys = torch.cat([ends[:, 0] * nodes + ends[:, 1], ends[:, 1] * nodes + ends[:, 0]])
        types = self.bond_types[rows].repeat(2)
        keys, order = keys.sort()
        types = types[order]
        edge_keys = source * nodes + target
        found_at = torch.searchsorted(keys, edge_keys).clamp_max(max(len(keys) - 1, 0))
        bonded = keys[found_at] == edge_keys if len(keys) else torch.zeros_like(edge_keys, dtype=torch.bool)
        one_hot = torch.zeros(len(edge_keys), 4)
        one_hot[bonded, types[found_at[bonded]]] = 1.0
        distance = (pos[target] - pos[source]).norm(dim=1, keepdim=True)
        return GraphBatch(
            x=x,
            edge_index=torch.stack([source, target]),
            edge_attr=torch.cat([one_hot, distance], dim=1),
            batch=graph,
            num_graphs=len(molecules),
        )


@dataclass
class GraphSplit(Split):
    """A split whose inputs are molecular graphs: ``x`` holds molecule indices into ``graphs``.

    ``batches`` yields ``(GraphBatch, y, mask)``, which the trainer consumes like any ``(x, y, mask)``: it
    moves the batch with ``.to(device)`` and hands it to the model.
    """

    graphs: MoleculeGraphs | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.graphs is None:
            raise ValueError("a GraphSplit needs the MoleculeGraphs its molecule indices refer to")
        if self.x.dim() != 1 or self.x.dtype != torch.int64:
            raise ValueError("a GraphSplit's x must be a 1-D int64 tensor of molecule indices")

    def batches(  # type: ignore[override]
        self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = False
    ) -> Iterator[tuple[GraphBatch, dict[str, Tensor], dict[str, Tensor]]]:
        assert self.graphs is not None
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield (
                self.graphs.batch(self.x[idx]),
                {k: v[idx] for k, v in self.y.items()},
                {k: v[idx] for k, v in self.mask.items()},
            )


# ---------------------------------------------------------------------------------------- bond perception
def covalent_bonds(charges: Tensor, positions: Tensor, factor: float = BOND_FACTOR,
                   chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Bonds of padded molecules by the covalent-radius rule: ``(molecule, i, j)`` rows (``i < j``), lengths.

    ``charges (N, A)`` (0 marks padding), ``positions (N, A, 3)`` in Å.
    """
    radius = torch.zeros(int(charges.max()) + 1 if charges.numel() else 1, dtype=torch.float64)
    for z, r in COVALENT_RADIUS.items():
        if z < len(radius):
            radius[z] = r
    found: list[Tensor] = []
    lengths: list[Tensor] = []
    upper = torch.ones(charges.shape[1], charges.shape[1], dtype=torch.bool).triu(1)
    for start in range(0, len(charges), chunk):
        atoms = charges[start:start + chunk]
        xyz = positions[start:start + chunk].to(torch.float64)
        distance = torch.cdist(xyz, xyz)
        present = atoms > 0
        limit = factor * (radius[atoms][:, :, None] + radius[atoms][:, None, :])
        bonded = present[:, :, None] & present[:, None, :] & upper & (distance <= limit)
        index = bonded.nonzero()
        index[:, 0] += start
        found.append(index)
        lengths.append(distance[bonded])
    return torch.cat(found), torch.cat(lengths)


def _bond_orders(z: list[int], bonds: list[tuple[int, int]], relative_length: list[float]) -> list[int]:
    """Orders (1..3) for one molecule's bonds: raise bonds between atoms with free valence, one at a time.

    Each round takes the atom with the fewest candidate partners (neighbours with free valence, through a bond
    below triple; ties: lowest index), and raises its relatively shortest such bond. Starting from the most
    constrained atom is the classic greedy for matchings; it gives a Kekulé structure for rings like benzene.
    """
    free = [VALENCE.get(a, 1) for a in z]
    for a, b in bonds:
        free[a] -= 1
        free[b] -= 1
    orders = [1] * len(bonds)
    incident: list[list[int]] = [[] for _ in z]
    for e, (a, b) in enumerate(bonds):
        incident[a].append(e)
        incident[b].append(e)

    def options(atom: int) -> list[int]:
        return [
            e for e in incident[atom]
            if orders[e] < 3 and free[bonds[e][0] if bonds[e][1] == atom else bonds[e][1]] > 0
        ]

    while True:
        choices = [
            (len(found), atom, found) for atom in range(len(z)) if free[atom] > 0 and (found := options(atom))
        ]
        if not choices:
            return orders
        _, _, found = min(choices, key=lambda c: (c[0], c[1]))
        e = min(found, key=relative_length.__getitem__)
        orders[e] += 1
        free[bonds[e][0]] -= 1
        free[bonds[e][1]] -= 1


def _features(z: Tensor, bonds: Tensor, types: Tensor, aromatic: Tensor,
              hybridisation: Tensor | None) -> Tensor:
    """Node features of one molecule (:data:`NODE_FEATURES`); ``hybridisation``: 0 none, 1 sp, 2 sp2, 3 sp3.

    Without ``hybridisation`` it is derived from the bond orders (see the module docstring).
    """
    n = len(z)
    x = torch.zeros(n, len(NODE_FEATURES))
    x[torch.arange(n), torch.tensor([_TYPE_INDEX[int(v)] for v in z], dtype=torch.long)] = 1.0
    x[:, 5] = z.to(torch.float32)
    x[:, 6] = aromatic.to(torch.float32)
    if hybridisation is None:
        double = torch.zeros(n)
        triple = torch.zeros(n)
        for column in (0, 1):
            double.index_add_(0, bonds[:, column], (types == 1).float())
            triple.index_add_(0, bonds[:, column], (types == 2).float())
        hybridisation = torch.where(
            (triple > 0) | (double > 1), 1, torch.where(double > 0, 2, 3)
        ).where(z > 1, torch.zeros((), dtype=torch.long))
    for flag, column in ((1, 7), (2, 8), (3, 9)):
        x[:, column] = (hybridisation == flag).float()
    hydrogens = torch.zeros(n)
    for a, b in ((0, 1), (1, 0)):
        hydrogens.index_add_(0, bonds[:, b], (z[bonds[:, a]] == 1).float())
    x[:, 10] = hydrogens
    return x


def _rdkit_molecule(z: Sequence[int], pos: np.ndarray) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Bonds, bond types, aromatic flags and hybridisation (0 none, 1 sp, 2 sp2, 3 sp3) perceived by RDKit."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Chem.rdchem import BondType, HybridizationType

    molecule = Chem.RWMol()
    conformer = Chem.Conformer(len(z))
    for index, (number, xyz) in enumerate(zip(z, pos, strict=True)):
        molecule.AddAtom(Chem.Atom(int(number)))
        conformer.SetAtomPosition(index, [float(v) for v in xyz])
    molecule.AddConformer(conformer, assignId=True)
    rdDetermineBonds.DetermineBonds(molecule, charge=0)
    flags = (
        Chem.SanitizeFlags.SANITIZE_KEKULIZE
        | Chem.SanitizeFlags.SANITIZE_SETAROMATICITY
        | Chem.SanitizeFlags.SANITIZE_SETHYBRIDIZATION
    )
    Chem.SanitizeMol(molecule, flags)
    kinds = {BondType.SINGLE: 0, BondType.DOUBLE: 1, BondType.TRIPLE: 2, BondType.AROMATIC: 3}
    hybrid = {HybridizationType.SP: 1, HybridizationType.SP2: 2, HybridizationType.SP3: 3}
    pairs, types = [], []
    for bond in molecule.GetBonds():
        a, b = sorted((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
        pairs.append((a, b))
        types.append(kinds[bond.GetBondType()])  # KeyError for exotic bond types -> covalent fallback
    atoms = list(molecule.GetAtoms())
    return (
        torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        torch.tensor(types, dtype=torch.long),
        torch.tensor([a.GetIsAromatic() for a in atoms], dtype=torch.bool),
        torch.tensor([hybrid.get(a.GetHybridization(), 0) for a in atoms], dtype=torch.long),
    )


def build_molecule_graphs(
    charges: Tensor, positions: Tensor, bonds: BondPerception = "covalent"
) -> tuple[MoleculeGraphs, int]:
    """Graphs of padded molecules ``charges (N, A)``, ``positions (N, A, 3)`` (Å); returns the store and the
    number of molecules for which RDKit failed and the covalent rule was used (0 with ``"covalent"``)."""
    if bonds not in ("covalent", "rdkit"):
        raise ValueError(f"bonds must be 'covalent' or 'rdkit', got {bonds!r}")
    if bonds == "rdkit":
        try:
            import rdkit  # noqa: F401
        except ImportError as error:
            raise ModuleNotFoundError(
                "bonds='rdkit' needs RDKit: pip install rdkit (or use the default bonds='covalent')"
            ) from error
    n_atoms = (charges > 0).sum(dim=1)
    index, lengths = covalent_bonds(charges, positions)
    per_molecule = torch.bincount(index[:, 0], minlength=len(charges)).tolist()
    radius = torch.tensor([COVALENT_RADIUS.get(z, 1.0) for z in range(10)], dtype=torch.float64)
    z_pairs = charges[index[:, 0], index[:, 1]], charges[index[:, 0], index[:, 2]]
    relative = (lengths / (radius[z_pairs[0]] + radius[z_pairs[1]])).tolist()
    local = index[:, 1:].tolist()
    features, all_bonds, all_types = [], [], []
    failures = 0
    start = 0
    for m in range(len(charges)):
        count, n = per_molecule[m], int(n_atoms[m])
        z = charges[m, :n]
        pairs = local[start:start + count]
        hybridisation: Tensor | None = None
        aromatic = torch.zeros(n, dtype=torch.bool)
        done = False
        if bonds == "rdkit":
            try:
                perceived = _rdkit_molecule(z.tolist(), positions[m, :n].numpy())
                bond_index, types, aromatic, hybridisation = perceived
                done = True
            except Exception:  # noqa: BLE001 - any RDKit perception failure falls back, and is counted
                failures += 1
                hybridisation, aromatic = None, torch.zeros(n, dtype=torch.bool)
        if not done:
            orders = _bond_orders(z.tolist(), [(a, b) for a, b in pairs], relative[start:start + count])
            bond_index = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
            types = torch.tensor(orders, dtype=torch.long) - 1
        start += count
        features.append(_features(z, bond_index, types, aromatic, hybridisation))
        all_bonds.append(bond_index)
        all_types.append(types)
    zero = torch.zeros(1, dtype=torch.long)
    graphs = MoleculeGraphs(
        atom_ptr=torch.cat([zero, torch.cumsum(n_atoms, 0)]),
        node_features=torch.cat(features),
        positions=torch.cat([positions[m, : int(n_atoms[m])] for m in range(len(charges))]).to(torch.float32),
        bond_ptr=torch.cat([zero, torch.cumsum(torch.tensor([len(b) for b in all_bonds]), 0)]),
        bonds=torch.cat(all_bonds),
        bond_types=torch.cat(all_types),
    )
    return graphs, failures


# ---------------------------------------------------------------------------------------------- loading
def _cache_key(files: Sequence[os.PathLike[str]], bonds: str) -> str:
    h = hashlib.sha256(f"qm9graph-v{_CACHE_VERSION}-{bonds}".encode())
    for f in files:
        stat = os.stat(f)
        h.update(f"{os.path.realpath(f)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def qm9_graph_arrays(
    source: str | os.PathLike[str] | None = None,
    *,
    bonds: BondPerception = "covalent",
    use_cache: bool = True,
) -> tuple[MoleculeGraphs, dict[str, Tensor], int]:
    """The graphs of all molecules, the 11 targets (published units, float64), and RDKit's failure count."""
    files = _qm9pack_files(source)
    path = cache_dir() / f"qm9graph_{_cache_key(files, bonds)}.pt" if use_cache else None
    graph_fields = list(MoleculeGraphs.__dataclass_fields__)
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, dict) and int(cached.get("version", -1)) == _CACHE_VERSION:
                graphs = MoleculeGraphs(**{k: cached[k] for k in graph_fields})
                targets = {t.name: cached["y_" + t.name] for t in QM9_TASKS}
                return graphs, targets, int(cached["failures"])
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError):
            pass  # a corrupt, partial or older cache file is rebuilt
    raw = read_qm9_tables(files)
    graphs, failures = build_molecule_graphs(raw["charges"], raw["positions"], bonds)
    targets = qm9_targets(raw)
    if path is not None:
        payload: dict[str, Tensor] = {
            **graphs.to_dict(),
            **{"y_" + k: v for k, v in targets.items()},
            "failures": torch.tensor(failures),
            "version": torch.tensor(_CACHE_VERSION),
        }
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
    return graphs, targets, failures


def load_qm9_graph(
    subset: int | None = None,
    *,
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    target: str | None = None,
    bonds: BondPerception = "covalent",
    source: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> MultiTaskData:
    """QM9 as molecular graphs under the published split (see the module docstring).

    Args:
        subset: ``None`` (default): all molecules, a seeded random 110,831 / 10,000 / 10,000 split (the
            sizes of Nash-MTL's and FAMO's code, whose split is a random shuffle too, not reproduced here).
            An int: a seeded random subset of that many molecules, split in the same proportions (for
            smoke runs on a CPU).
        seed: seed of the subset and split draw (not of training).
        tasks, target: as in :func:`taskbalance.data.qm9.load_qm9`.
        bonds: ``"covalent"`` (default) or ``"rdkit"`` bond perception.
        source: a folder with ``qm9_part{1,2,3}.csv`` in qm9pack's format (default: the installed wheel).
        use_cache: read and write the graph cache.

    Targets are z-scored with training statistics (``Task.scale`` is the training std, so metrics are MAE
    in the published units) and trained with MSE, as in the published code.
    """
    known = [t.name for t in QM9_TASKS]
    chosen = list(known if tasks is None else tasks)
    if [t for t in chosen if t not in known] or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"tasks must be distinct names among {known}, got {chosen}")
    if target is not None and target not in chosen:
        raise ValueError(f"target must be one of the chosen tasks {chosen}, got {target!r}")
    graphs, targets, failures = qm9_graph_arrays(source, bonds=bonds, use_cache=use_cache)
    n = len(graphs)
    total = sum(PAPER_SPLIT)
    if subset is None:
        if n < total:
            raise ValueError(
                f"the published split needs {total:,} molecules, the source has {n:,}; pass subset="
            )
        sizes: tuple[int, int, int] = PAPER_SPLIT
    else:
        if not 3 <= subset <= n:
            raise ValueError(f"subset must be between 3 and {n} molecules, got {subset}")
        sizes = split_sizes(int(subset), tuple(s / total for s in PAPER_SPLIT))
    by_name = {t.name: t for t in QM9_TASKS}
    if target is not None:
        by_name = {k: replace(t, role="target" if k == target else "auxiliary") for k, t in by_name.items()}
    if failures:
        warnings.warn(f"RDKit could not perceive {failures} molecule(s); the covalent rule was used for them",
                      stacklevel=2)
    data = assemble(
        "qm9_graph",
        [by_name[t] for t in chosen],
        torch.arange(n),
        {t: targets[t] for t in chosen},
        None,
        split_indices(n, sizes, seed),
        standardise_inputs=False,
        protocol={
            "protocol": "paper",
            "subset": subset,
            "seed": seed,
            "tasks": chosen,
            "molecules": n,
            "bonds": bonds,
            "rdkit_failures": failures,
            "inputs": "complete-graph: 11 node features, bond one-hot + distance",
            **({"target": target} if target is not None else {}),
        },
    )

    def as_graphs(split: Split) -> GraphSplit:  # assemble stored the indices as float32: exact below 2**24
        return GraphSplit(x=split.x.long(), y=split.y, mask=split.mask, graphs=graphs)

    return MultiTaskData(
        data.name, data.tasks, as_graphs(data.train), as_graphs(data.val), as_graphs(data.test), data.protocol
    )
