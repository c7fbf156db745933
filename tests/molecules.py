"""Small molecules with textbook geometries (Å) for the graph and network tests."""

from __future__ import annotations

import math

import torch
from torch import Tensor

Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}


def _benzene() -> tuple[list[str], list[tuple[float, float, float]]]:
    symbols, xyz = [], []
    for k in range(6):
        angle = math.pi / 3 * k
        symbols.append("C")
        xyz.append((1.39 * math.cos(angle), 1.39 * math.sin(angle), 0.0))
    for k in range(6):
        angle = math.pi / 3 * k
        symbols.append("H")
        xyz.append((2.47 * math.cos(angle), 2.47 * math.sin(angle), 0.0))
    return symbols, xyz


MOLECULES: dict[str, tuple[list[str], list[tuple[float, float, float]]]] = {
    "methane": (
        ["C", "H", "H", "H", "H"],
        [(0, 0, 0), (0.629, 0.629, 0.629), (-0.629, -0.629, 0.629), (-0.629, 0.629, -0.629),
         (0.629, -0.629, -0.629)],
    ),
    "water": (["O", "H", "H"], [(0, 0, 0.119), (0, 0.763, -0.477), (0, -0.763, -0.477)]),
    "acetylene": (["C", "C", "H", "H"], [(0, 0, 0.60), (0, 0, -0.60), (0, 0, 1.66), (0, 0, -1.66)]),
    "hydrogen_cyanide": (["C", "N", "H"], [(0, 0, -0.50), (0, 0, 0.656), (0, 0, -1.566)]),
    "formaldehyde": (
        ["C", "O", "H", "H"], [(0, 0, -0.53), (0, 0, 0.68), (0, 0.94, -1.11), (0, -0.94, -1.11)]
    ),
    "ethylene": (
        ["C", "C", "H", "H", "H", "H"],
        [(0, 0, 0.667), (0, 0, -0.667), (0, 0.923, 1.238), (0, -0.923, 1.238), (0, 0.923, -1.238),
         (0, -0.923, -1.238)],
    ),
    "fluoromethane": (
        ["C", "F", "H", "H", "H"],
        [(0, 0, 0), (0, 0, 1.383), (0, 1.03, -0.36), (0.89, -0.515, -0.36), (-0.89, -0.515, -0.36)],
    ),
    "benzene": _benzene(),
}


def padded(names: list[str], width: int = 29) -> tuple[Tensor, Tensor]:
    """``charges (N, width)`` and ``positions (N, width, 3)`` of the named molecules, zero-padded."""
    charges = torch.zeros(len(names), width, dtype=torch.long)
    positions = torch.zeros(len(names), width, 3, dtype=torch.float64)
    for row, name in enumerate(names):
        symbols, xyz = MOLECULES[name]
        charges[row, : len(symbols)] = torch.tensor([Z[s] for s in symbols])
        positions[row, : len(symbols)] = torch.tensor(xyz, dtype=torch.float64)
    return charges, positions
