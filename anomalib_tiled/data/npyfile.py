"""Plain ``.npy`` files read and written in row ranges, never memory-mapped.

The run keeps decoded images, masks and tile predictions in ``.npy`` files; reading them with
``os.pread`` (no memory map) keeps them out of the process's resident memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from anomalib_tiled.errors import DataError


class NpyFile:
    """A ``.npy`` file of fixed shape read and written in row ranges with ``pread``/``pwrite``.

    The file stays a valid ``.npy`` (``numpy.load`` reads it) while no part of it is memory-mapped.

    Args:
        path: File path.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(handle)
            self.offset = handle.tell()
        if fortran or np.dtype(dtype).hasobject:
            # Object arrays would be unpickled: never from a run directory.
            msg = f"{path}: not a plain numeric array file; the run directory is corrupt, train again"
            raise DataError(msg)
        self.shape: tuple[int, ...] = shape
        self.dtype = np.dtype(dtype)
        self.item_shape = shape[1:]
        self.item_bytes = int(np.prod(self.item_shape, dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def create(cls, path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> NpyFile:
        """Create a zero-filled (sparse) ``.npy`` file of ``shape``."""
        dtype = np.dtype(dtype)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
        with Path(path).open("wb") as handle:
            np.lib.format.write_array_header_2_0(handle, header)
            offset = handle.tell()
            handle.truncate(offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return cls(path)

    def __len__(self) -> int:
        return self.shape[0]

    def write(self, index: int, values: np.ndarray) -> None:
        """Write items ``index .. index + len(values)``."""
        data = np.ascontiguousarray(values, dtype=self.dtype)
        if data.shape[1:] != self.item_shape:
            msg = f"{self.path}: expected items of shape {self.item_shape}, got {data.shape[1:]}"
            raise ValueError(msg)
        with self.path.open("r+b") as handle:
            os.pwrite(handle.fileno(), data.tobytes(), self.offset + index * self.item_bytes)

    def read(self, index: int, count: int = 1) -> np.ndarray:
        """Items ``index .. index + count`` as ``(count, *item_shape)``."""
        return self._pread(index * self.item_bytes, count * self.item_bytes).reshape(count, *self.item_shape)

    def read_rows(self, index: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first item axis of item ``index``, as ``(stop - start, ...)``."""
        row_bytes = self.item_bytes // self.item_shape[0]
        raw = self._pread(index * self.item_bytes + start * row_bytes, (stop - start) * row_bytes)
        return raw.reshape(stop - start, *self.item_shape[1:])

    def _pread(self, position: int, size: int) -> np.ndarray:
        with self.path.open("rb") as handle:
            raw = os.pread(handle.fileno(), size, self.offset + position)
        if len(raw) != size:
            msg = f"{self.path}: file is truncated; delete it and run again"
            raise DataError(msg)
        return np.frombuffer(raw, dtype=self.dtype)
