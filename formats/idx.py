"""IDX files (the MNIST format) read with numpy alone: the trainers load them through training/data.py, the
service reads /similar's reference images, and the load tests read test images here, none importing torch."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_LABELS = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]

# IDX type codes (third byte of the magic number) -> numpy dtype, big-endian as the format says.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8"),
}


class DataFormatError(ValueError):
    """A data file is missing, truncated or not in the format it claims; the message names the file."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_maybe_gzip(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    return raw


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read an IDX file (raw or gzipped), validating magic number, dimensions and payload size."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such file")
    data = open_maybe_gzip(path)
    if len(data) < 4:
        raise DataFormatError(f"{path}: {len(data)} bytes is too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(f"{path}: bad IDX magic number 0x{data[:4].hex()}")
    if expected_ndim is not None and ndim != expected_ndim:
        raise DataFormatError(f"{path}: expected {expected_ndim} dimensions, header says {ndim}")
    header_end = 4 + 4 * ndim
    if len(data) < header_end:
        raise DataFormatError(f"{path}: truncated header ({len(data)} bytes, needs {header_end})")
    dims = struct.unpack(f">{ndim}I", data[4:header_end])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims)) * dtype.itemsize
    payload = len(data) - header_end
    if payload != expected:
        raise DataFormatError(
            f"{path}: header promises {dims} ({expected} bytes of data) but the file holds {payload} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header_end).reshape(dims).astype(dtype.newbyteorder("="))


def find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataFormatError(f"{directory}: neither {stem} nor {stem}.gz found")
