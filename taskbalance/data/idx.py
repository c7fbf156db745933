"""Reader and writer for the IDX format of (Fashion-)MNIST, gzipped or not.

Format (LeCun et al.): two zero bytes, a type code (0x08 = unsigned byte, …), the number of dimensions,
then each dimension as a big-endian 32-bit integer, then the data in C order, big-endian.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

__all__ = ["read_idx", "write_idx"]

_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[np.dtype, int] = {v.newbyteorder("="): k for k, v in _TYPES.items()}


def _open(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read()


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip detected from the file's magic bytes) into a native-endian array."""
    path = Path(path)
    data = _open(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    dtype = _TYPES[data[2]]
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({expected} bytes), file has "
            f"{len(data) - header} data bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> None:
    """Write ``array`` as IDX (gzipped when ``compress`` or, by default, when the name ends in ``.gz``)."""
    path = Path(path)
    native = np.asarray(array)
    code = _CODES.get(native.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(f"IDX cannot store dtype {native.dtype}")
    payload = bytes([0, 0, code, native.ndim]) + struct.pack(f">{native.ndim}I", *native.shape)
    payload += np.ascontiguousarray(native, dtype=_TYPES[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    if compress:
        payload = gzip.compress(payload, mtime=0)
    path.write_bytes(payload)
