"""Files in qm9pack's CSV layout, written by the tests: random molecules and their 12 targets.

Shared by the data tests and the bench suites that load QM9 (``tests/data/test_data_qm9.py``,
``tests/data/test_qm9_graph.py``, ``tests/bench/``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = (
    "XYZ_file,Index,SMILES,N_atoms,Stoichiometry,Elements,XYZ_Ang,Dipole_debye,Polarizability_bohr3,HOMO_au,"
    "LUMO_au,HOMO_LUMO_gap_au,R2_bohr2,ZPVE_au,InternalEnergy_0K_au,InternalEnergy_298K_au,Enthalphy_298K_au,"
    "GibbsFreeEnergy_298K_au,Heatcapacity_Cv_cal_mol_K"
)
ELEMENTS = ("H", "C", "N", "O", "F")


def _molecules(n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i == 0:
            symbols, xyz = ["H", "H"], np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.74]])
        else:
            k = int(rng.integers(3, 12))
            symbols = list(rng.choice(ELEMENTS, k))
            xyz = rng.normal(0, 1.5, (k, 3))
        targets = rng.normal(0, 1, 11) + np.array([2, 70, -0.25, 0.01, 1000, 0.1, -400, -400, -400, -400, 30])
        out.append({"symbols": symbols, "xyz": xyz, "targets": targets})
    return out


def _write_qm9pack_like(folder: Path, molecules: list[dict[str, object]]) -> None:
    """Three CSV parts in qm9pack's layout (quoted list columns), split like the wheel's files."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, m in enumerate(molecules):
        symbols, xyz, targets = m["symbols"], m["xyz"], m["targets"]
        counts = [symbols.count(e) for e in ELEMENTS]  # type: ignore[attr-defined]
        elements = "[" + ",".join(f"'{s}'" for s in symbols) + "]"  # type: ignore[attr-defined]
        coordinates = "[" + ",".join("[" + ",".join(repr(float(v)) for v in row) + "]" for row in xyz) + "]"  # type: ignore[attr-defined]
        t = [repr(float(v)) for v in targets]  # type: ignore[attr-defined]
        gap = repr(float(targets[3] - targets[2]))  # type: ignore[index]
        lines.append(
            f'"dsgdb9nsd_{i:06d}.xyz",{i + 1},"C",{len(symbols)},"{counts}","{elements}","{coordinates}",'  # type: ignore[arg-type]
            + ",".join(t[:4])
            + f",{gap},"
            + ",".join(t[4:])
        )
    thirds = np.array_split(np.arange(len(lines)), 3)
    for part, rows in enumerate(thirds, start=1):
        text = COLUMNS + "\n" + "\n".join(lines[r] for r in rows) + "\n"
        (folder / f"qm9_part{part}.csv").write_text(text)
