"""On-disk index: a folder with ``manifest.json``, ``features.h5`` and the faiss file.

``features.h5`` holds, row-aligned: ``names`` (as in the file list), ``paths`` (absolute, for display),
``labels``, ``file_size``, ``file_mtime`` and either ``descriptors`` (float32, N x D) or ``codes``
(uint8, N x bits/8). It is written row batch by row batch while extraction runs (a crash loses at most
the current batch) inside a work folder; the finished index is moved into place by renames, so a
reader never sees half an index.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CbirError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.h5"
FAISS_FILES = {"cosine": "cosine.faiss", "hamming": "hamming.faiss"}


def _h5py():
    import h5py

    return h5py


_STR = None


def _str_dtype():
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
    """Appends rows to an HDF5 file with resizable datasets; flushes after every batch."""

    def __init__(self, path: os.PathLike, dim: int, dtype: str, key: str = "descriptors", attrs: Optional[dict] = None) -> None:
        h5py = _h5py()
        self.path = Path(path)
        self.key = key
        new = not self.path.exists()
        self.f = h5py.File(self.path, "a")
        if new or key not in self.f:
            s = _str_dtype()
            for name, dt in (("names", s), ("paths", s), ("labels", s)):
                self.f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(1024,))
            self.f.create_dataset("file_size", shape=(0,), maxshape=(None,), dtype="i8", chunks=(1024,))
            self.f.create_dataset("file_mtime", shape=(0,), maxshape=(None,), dtype="f8", chunks=(1024,))
            self.f.create_dataset(key, shape=(0, dim), maxshape=(None, dim), dtype=dtype, chunks=(max(1, min(1024, (1 << 20) // max(1, dim * 4))), dim))
            for k, v in (attrs or {}).items():
                self.f.attrs[k] = v
        elif self.f[key].shape[1] != dim:
            raise CbirError(f"{self.path}: holds {self.f[key].shape[1]}-d rows, cannot append {dim}-d rows")

    def __len__(self) -> int:
        return int(self.f["names"].shape[0])

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
        self.f.flush()

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RowSegments:
    """Extracted rows kept as one small HDF5 file per batch, each written to a temporary name and renamed.

    A crash (even ``kill -9`` in the middle of a write) can lose only the batch being written: every
    finished segment is a complete file. Segments written under another extractor key are ignored.
    """

    def __init__(self, folder: os.PathLike, key: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key = key
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink()
        self._next = 1 + max((int(p.stem.split("-")[1]) for p in self.folder.glob("part-*.h5")), default=0)

    def append(self, rows: Rows) -> None:
        if not rows.names:
            return
        final = self.folder / f"part-{self._next:07d}.h5"
        tmp = final.with_suffix(".tmp")
        with FeatureWriter(tmp, rows.values.shape[1], "f4", key="raw", attrs={"key": self.key}) as w:
            w.append(rows)
        os.replace(tmp, final)
        self._next += 1

    def read(self) -> Tuple[Dict[str, np.ndarray], List[str]]:
        """All rows of this key in write order (a later row of the same name supersedes an earlier one) and
        the names of segments that could not be read."""
        parts, bad = [], []
        for p in sorted(self.folder.glob("part-*.h5")):
            try:
                rows, attrs = read_rows(p)
            except OSError:
                bad.append(p.name)
                continue
            if attrs.get("key") == self.key:
                parts.append(rows)
        if not parts:
            return {}, bad
        return {k: np.concatenate([r[k] for r in parts]) for k in parts[0]}, bad


def write_features(path: os.PathLike, rows: Rows, extra: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Write a complete features file: row metadata, ``descriptors`` and ``extra`` arrays (``codes``, ``raw``)."""
    with FeatureWriter(path, rows.values.shape[1], "f4", key="descriptors") as w:
        w.append(rows)
        for k, v in (extra or {}).items():
            w.f.create_dataset(k, data=v)


def read_rows(path: os.PathLike, key: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], dict]:
    """All datasets of a features file as numpy arrays (strings decoded) and its attributes."""
    h5py = _h5py()
    with h5py.File(path, "r") as f:
        out = {}
        for name in f:
            d = f[name]
            if d.dtype.kind == "O":
                out[name] = np.array([x.decode("utf-8") if isinstance(x, bytes) else x for x in d[()]], dtype=object)
            else:
                out[name] = d[()]
        return out, dict(f.attrs)


def write_json_atomic(obj, path: os.PathLike) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: os.PathLike) -> dict:
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.is_file():
        hint = ""
        if partial_dir(folder).exists():
            hint = f" (an unfinished build is in {partial_dir(folder)}: run the same `cbir index build` again to resume)"
        elif not folder.exists():
            hint = " (folder not found)"
        raise CbirError(f"{folder}: not a cbir index, no {MANIFEST}{hint}")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CbirError(f"{p}: corrupt manifest ({e})") from None
    v = m.get("format_version")
    if v != FORMAT_VERSION:
        raise CbirError(f"{p}: index format version {v}, this cbir reads version {FORMAT_VERSION}; rebuild the index")
    return m


def partial_dir(folder: os.PathLike) -> Path:
    """Where an unfinished build of ``folder`` keeps its work (beside it, so ``folder`` is never half-written)."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".partial")


def commit_folder(work: Path, final: Path) -> None:
    """Move the finished ``work`` folder to ``final``; an existing index there is replaced as a whole."""
    final = Path(final)
    old = final.with_name(final.name + f".old-{os.getpid()}-{int(time.time())}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(work, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def unique_names(names: Sequence[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise CbirError(f"image {n!r} appears twice in the list")
        seen.add(n)
