"""Feature rows: the row-aligned datasets of ``features.h5`` (and of the other HDF5 files of an index folder).

``features.h5`` holds, row-aligned: ``names`` (as in the file list), ``paths`` (absolute, for display), ``labels``,
``file_size``, ``file_mtime``, ``ids`` and ``descriptors`` (float32, N x D), with ``codes`` (uint8, N x bits/8) for a
binary index and ``raw`` (the descriptors before a learned post transform) with ``--keep-raw``. A build writes rows batch
by batch into :class:`RowSegments` while extraction runs (a crash loses at most the current batch), then the final file
chunk by chunk through a :class:`FeatureWriter`; readers get :func:`read_rows` (vectors as :class:`LazyRows`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CbirError
from .atomic import h5_writing, write_error


def _h5py():
    import h5py

    return h5py


_STR = None


def str_dtype():
    global _STR
    if _STR is None:
        _STR = _h5py().string_dtype("utf-8")
    return _STR


@dataclass
class Rows:
    """A batch of extracted rows: one per image."""

    names: List[str]
    paths: List[str]
    labels: List[Optional[str]]
    sizes: List[int]
    mtimes: List[float]
    values: np.ndarray  # float32 (n, D) or uint8 (n, B)


class FeatureWriter:
    """Appends rows to an open HDF5 file (``h5py.File``) with resizable datasets."""

    def __init__(self, f, dim: int, dtype: str, key: str = "descriptors", attrs: Optional[dict] = None) -> None:
        self.f = f
        self.key = key
        if key not in self.f:
            s = str_dtype()
            for name, dt in (("names", s), ("paths", s), ("labels", s)):
                self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
            self.f.create_dataset("file_size", shape=(0,), maxshape=(None,), dtype="i8", chunks=(1024,))
            self.f.create_dataset("file_mtime", shape=(0,), maxshape=(None,), dtype="f8", chunks=(1024,))
            self.f.create_dataset(key, shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(max(1, min(1024, (1 << 20) // max(1, dim * 4))), dim))
            for k, v in (attrs or {}).items():
                self.f.attrs[k] = v
        elif self.f[key].shape[1] != dim:
            raise CbirError(f"{self.f.filename}: holds {self.f[key].shape[1]}-d rows, cannot append {dim}-d rows")

    def __len__(self) -> int:
        return int(self.f["names"].shape[0])

    def append_array(self, name: str, values: np.ndarray) -> None:
        """Append rows to a resizable dataset ``name`` beside the row metadata (``ids``, ``codes``, ``raw``)."""
        values = np.asarray(values)
        if name not in self.f:
            shape = values.shape[1:]
            row_bytes = max(1, int(np.prod(shape)) * values.dtype.itemsize)
            self.f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=values.dtype,
                                  chunks=(max(1, min(4096, (1 << 20) // row_bytes)), *shape))
        d = self.f[name]
        n0 = d.shape[0]
        d.resize((n0 + len(values), *d.shape[1:]))
        d[n0:] = values

    def append(self, rows: Rows) -> None:
        n0 = len(self)
        n = len(rows.names)
        if n == 0:
            return
        for name, vals in (("names", rows.names), ("paths", rows.paths), ("labels", ["" if l is None else l for l in rows.labels]),
                           ("file_size", rows.sizes), ("file_mtime", rows.mtimes)):
            d = self.f[name]
            d.resize((n0 + n,))
            d[n0:] = np.asarray(vals, dtype=object if d.dtype.kind == "O" else d.dtype)
        d = self.f[self.key]
        d.resize((n0 + n, d.shape[1]))
        d[n0:] = rows.values


class RowSegments:
    """Extracted rows kept as one small HDF5 file per batch, each written to a temporary name and renamed.

    A crash (even ``kill -9`` in the middle of a write) can lose only the batch being written: every
    finished segment is a complete file. Segments are not fsynced (a build writes one per batch): a power cut can
    leave recent ones empty, which :meth:`locate` reports as unreadable and the build extracts again. Segments
    written under another extractor key are ignored.
    """

    def __init__(self, folder: os.PathLike, key: str) -> None:
        self.folder = Path(folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.folder, e) from None
        self.key = key
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink()
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self.folder.glob("part-*.h5")), default=0)

    def append(self, rows: Rows) -> None:
        if not rows.names:
            return
        final = self.folder / f"part-{self._next:07d}.h5"
        s = str_dtype()
        # one a power cut empties is unreadable: its images are extracted again. Written once, never appended to:
        # fixed-size datasets (1.1 ms per 16 rows, 4.2 ms as FeatureWriter's resizable chunked ones)
        with h5_writing(final, durable=False) as f:
            f.attrs["key"] = self.key
            for name, vals in (("names", rows.names), ("paths", rows.paths), ("labels", ["" if l is None else l for l in rows.labels])):
                f.create_dataset(name, data=np.asarray(vals, dtype=object), dtype=s)
            f.create_dataset("file_size", data=np.asarray(rows.sizes, "i8"))
            f.create_dataset("file_mtime", data=np.asarray(rows.mtimes, "f8"))
            f.create_dataset("raw", data=np.asarray(rows.values, np.float32))
        self._next += 1

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("part-*.h5"))

    def locate(self) -> Tuple[List[Path], Dict[str, Tuple[int, int, int, float]], List[str]]:
        """Where each image's row is, without reading any descriptor: ``(segment files, {name: (segment, row, file
        size, mtime)}, unreadable segment names)``; a later segment supersedes an earlier one."""
        h5py = _h5py()
        files, where, bad = [], {}, []
        for p in sorted(self.folder.glob("part-*.h5")):
            try:
                with h5py.File(p, "r") as f:
                    if f.attrs.get("key") != self.key:
                        continue
                    names = [x.decode("utf-8") if isinstance(x, bytes) else x for x in f["names"][()]]
                    sizes, mtimes = f["file_size"][()], f["file_mtime"][()]
                    if f["raw"].shape[0] != len(names):
                        raise KeyError("row count")
            except (OSError, KeyError, ValueError):
                bad.append(p.name)
                continue
            files.append(p)
            for j, n in enumerate(names):
                where[n] = (len(files) - 1, j, int(sizes[j]), float(mtimes[j]))
        return files, where, bad

    @staticmethod
    def gather(files: Sequence[Path], locs: Sequence[Tuple[int, int]]) -> np.ndarray:
        """The ``raw`` rows at ``locs`` (segment, row), in that order; each segment file is opened once."""
        h5py = _h5py()
        locs = list(locs)
        out: List[Optional[np.ndarray]] = [None] * len(locs)
        by_seg: Dict[int, List[int]] = {}
        for i, (sgm, _) in enumerate(locs):
            by_seg.setdefault(sgm, []).append(i)
        for sgm, idx in by_seg.items():
            rows = sorted({locs[i][1] for i in idx})
            with h5py.File(files[sgm], "r") as f:
                block = f["raw"][rows]  # only these rows (h5py wants them increasing)
            at = {r: k for k, r in enumerate(rows)}
            for i in idx:
                out[i] = block[at[locs[i][1]]]
        return np.stack(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


def write_features(path: os.PathLike, rows: Rows, extra: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Write a complete features file atomically: row metadata, ``descriptors`` and ``extra`` arrays (``codes``, ``raw``)."""
    with h5_writing(path) as f:
        FeatureWriter(f, rows.values.shape[1], "f4", key="descriptors").append(rows)
        for k, v in (extra or {}).items():
            f.create_dataset(k, data=v)


def write_arrays(path: os.PathLike, arrays: Dict[str, np.ndarray], attrs: Optional[dict] = None) -> None:
    """A small HDF5 file of named arrays (learned extractor state), written atomically."""
    with h5_writing(path) as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        for k, v in (attrs or {}).items():
            f.attrs[k] = v


class LazyRows:
    """A numeric dataset of a features file read when first used: ``rows[i]``, ``rows[idx_array]``, ``np.asarray(rows)``.

    Opening an index reads names, paths and labels; the vectors (N x D floats: gigabytes at a million images) stay
    on disk until a caller needs them (evaluation of gallery queries, query expansion, updates), and then only
    the rows asked for, unless the whole array is. The file stays open: a folder replaced by a rebuild meanwhile
    (a new file at the same path) does not change what an opened index reads."""

    def __init__(self, h5file, name: str) -> None:
        d = h5file[name]
        self._f, self.name, self.shape, self.dtype = h5file, name, tuple(d.shape), np.dtype(d.dtype)
        self._all: Optional[np.ndarray] = None

    ndim = property(lambda self: len(self.shape))

    def close(self) -> None:
        """Close the file (HDF5 shares one open file per inode: a file rewritten in place must be closed before it is
        read again, or the new reader gets the old reader's cached metadata)."""
        with contextlib.suppress(Exception):
            self._f.close()

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):
        if self._all is None:
            self._all = self._f[self.name][()]
        return self._all if dtype is None else self._all.astype(dtype)

    def __getitem__(self, sel):
        if self._all is not None:
            return self._all[sel]
        if isinstance(sel, (int, np.integer)):
            sel = int(sel)
            sel = sel + self.shape[0] if sel < 0 else sel
            return self[np.array([sel])][0]
        if isinstance(sel, slice):
            return self._f[self.name][sel]
        idx = np.asarray(sel)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        shape = idx.shape
        idx = idx.astype(np.int64).ravel()
        idx = np.where(idx < 0, idx + self.shape[0], idx)
        if len(idx) == 0:
            return np.zeros((0, *self.shape[1:]), self.dtype)
        uniq, inv = np.unique(idx, return_inverse=True)
        got = self._f[self.name][uniq]  # h5py point selection: increasing, unique rows
        return got[inv.ravel()].reshape(*shape, *self.shape[1:])


def read_rows(path: os.PathLike, key: Optional[str] = None, lazy: Sequence[str] = ()) -> Tuple[Dict[str, Any], dict]:
    """All datasets of a features file as numpy arrays (strings decoded) and its attributes; those named in ``lazy``
    as :class:`LazyRows` (read when used)."""
    h5py = _h5py()
    keep = h5py.File(path, "r") if lazy else None  # the lazy datasets' handle (closed with them)
    with h5py.File(path, "r") as f:
        out = {}
        for name in f:
            d = f[name]
            if name in lazy and d.dtype.kind != "O":
                out[name] = LazyRows(keep, name)
            elif d.dtype.kind == "O":
                out[name] = np.array([x.decode("utf-8") if isinstance(x, bytes) else x for x in d[()]], dtype=object)
            else:
                out[name] = d[()]
        return out, dict(f.attrs)


def save_state(path: os.PathLike, arrays: Dict[str, np.ndarray], attrs: Optional[dict] = None) -> None:
    """An extractor's learned state (codebooks, whitening, hash centre) as an HDF5 file of arrays (atomic)."""
    write_arrays(path, arrays, attrs)


def load_state_file(path: os.PathLike) -> Dict[str, np.ndarray]:
    """The arrays of a state file written by :func:`save_state`, by their HDF5 paths."""
    import h5py

    with h5py.File(path, "r") as f:
        out: Dict[str, np.ndarray] = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out
