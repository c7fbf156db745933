"""Tiny (Fashion-)MNIST IDX files written by hand, independently of ``taskbalance.data.idx``.

Shared by the data tests and the bench suites that load Multi-Fashion."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX written by hand (independently of write_idx): unsigned bytes only."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(
    folder: Path, n_train: int = 40, n_test: int = 10, gz: bool = True, side: int = 28
) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, side, side), dtype=np.uint8)
        # image i: a filled block whose brightness encodes its label, plus noise
        images[:, 6:20, 6:20] = (20 * labels + 50)[:, None, None]
        images += rng.integers(0, 5, images.shape, dtype=np.uint8)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            payload = _idx_bytes(array)
            name = f"{prefix}-{kind}" + (".gz" if gz else "")
            (folder / name).write_bytes(gzip.compress(payload) if gz else payload)
