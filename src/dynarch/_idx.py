"""The IDX file format of MNIST and Fashion-MNIST: finding, reading and checking the files.

An IDX file is a big-endian header (two zero bytes, a dtype code, the number of dimensions,
then one uint32 size per dimension) followed by the data; the files may be gzipped. Every
damage is a :class:`DataCorruptError` naming the file and what is wrong with it.
:mod:`dynarch.data` turns the arrays into a :class:`~dynarch.data.Dataset`.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "labels-idx1-ubyte"
    >>> _ = path.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1]))
    >>> read_idx(path, 1, None).tolist()
    [7, 2, 1]
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["STEMS", "DataCorruptError", "find_idx", "read_idx", "read_idx_splits"]

STEMS = {  # Dataset field -> IDX file stem
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


class DataCorruptError(ValueError):
    """A dataset file is damaged (bad gzip, bad IDX header, truncated, wrong checksum).

    Example:
        >>> issubclass(DataCorruptError, ValueError)
        True
    """


def find_idx(d: Path) -> tuple[dict[str, Path], list[str]]:
    """The four IDX files in directory ``d`` (plain preferred over ``.gz``) and the fields
    (keys of :data:`STEMS`) with no file there.

    Example:
        >>> find_idx(Path("/nonexistent"))
        ({}, ['train_x', 'train_y', 'test_x', 'test_y'])
    """
    files: dict[str, Path] = {}
    for field, stem in STEMS.items():
        for candidate in (d / stem, d / f"{stem}.gz"):
            if candidate.is_file():
                files[field] = candidate
                break
    return files, [f for f in STEMS if f not in files]


def read_idx(path: Path, ndim: int, digest: str | None) -> np.ndarray:
    """The uint8 array of an ``ndim``-dimensional IDX file (gunzipped if it ends in ``.gz``).

    ``digest``: the expected SHA-256 of the decompressed bytes, or None to check only the
    structure. Raises :class:`DataCorruptError` for any damage.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "images-idx3-ubyte"
        >>> _ = path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2]))
        >>> try:
        ...     read_idx(path, 3, None)
        ... except DataCorruptError as exc:
        ...     print(str(exc).removeprefix(f"{path}: "))
        truncated: the header says shape (1, 2, 2) = 4 bytes of data, the file holds 0
    """
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataCorruptError(
                f"{path}: not a valid gzip file ({exc}); delete it and fetch it again"
            ) from exc
    if len(raw) < 4 + 4 * ndim:
        raise DataCorruptError(
            f"{path}: truncated: {len(raw)} bytes, shorter than the {4 + 4 * ndim}-byte IDX header"
        )
    magic = int.from_bytes(raw[:4], "big")
    expected_magic = 0x0800 | ndim
    if magic != expected_magic:
        what = (
            "not an IDX file (the first two bytes must be zero)"
            if raw[0] or raw[1]
            else f"dtype code 0x{raw[2]:02x}, expected 0x08 (unsigned byte)"
            if raw[2] != 0x08
            else f"{raw[3]} dimensions, expected {ndim}"
        )
        raise DataCorruptError(
            f"{path}: bad IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}: {what}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    need, got = int(np.prod(shape)), len(raw) - 4 - 4 * ndim
    if got != need:
        problem = "truncated" if got < need else "has trailing bytes"
        raise DataCorruptError(
            f"{path}: {problem}: the header says shape {shape} = {need} bytes of data, "
            f"the file holds {got}"
        )
    if digest is not None and (actual := hashlib.sha256(raw).hexdigest()) != digest:
        raise DataCorruptError(
            f"{path}: SHA-256 of the decompressed IDX data is {actual}, expected {digest}; "
            "the file is damaged or not the original, delete it and fetch it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_idx_splits(files: Mapping[str, Path], digests: Mapping[str, str]) -> dict[str, Tensor]:
    """Read the four files of an MNIST-style dataset (keys of :data:`STEMS`) as tensors.

    ``train_x``/``test_x`` come as float32 in [0, 1] of shape (N, 1, 28, 28), ``train_y``/
    ``test_y`` as int64 labels in 0..9. ``digests``: expected SHA-256 per field (missing
    fields are only checked structurally). Raises :class:`DataCorruptError`.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> for field, stem in STEMS.items():
        ...     dims = (1, 28, 28) if field.endswith("_x") else (1,)
        ...     header = struct.pack(f">4B{len(dims)}I", 0, 0, 8, len(dims), *dims)
        ...     _ = (d / stem).write_bytes(header + bytes(int(np.prod(dims))))
        >>> t = read_idx_splits(find_idx(d)[0], {})
        >>> tuple(t["train_x"].shape), t["train_x"].dtype, t["test_y"].tolist()
        ((1, 1, 28, 28), torch.float32, [0])
    """
    arrays = {f: read_idx(files[f], 3 if f.endswith("_x") else 1, digests.get(f)) for f in STEMS}
    tensors: dict[str, Tensor] = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        xs, ys = files[f"{split}_x"], files[f"{split}_y"]
        if x.shape[1:] != (28, 28):
            raise DataCorruptError(f"{xs}: images are {x.shape[1:]} pixels, expected (28, 28)")
        if len(x) != len(y):
            raise DataCorruptError(f"{xs} holds {len(x)} images but {ys} holds {len(y)} labels")
        if len(y) and int(y.max()) > 9:
            raise DataCorruptError(f"{ys}: label {int(y.max())} out of range, expected 0..9")
        fx = x.astype(np.float32)
        np.divide(fx, np.float32(255.0), out=fx)
        tensors[f"{split}_x"] = torch.from_numpy(fx).unsqueeze(1)
        tensors[f"{split}_y"] = torch.from_numpy(y.astype(np.int64))
    return tensors
