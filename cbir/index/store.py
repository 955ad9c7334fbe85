"""On-disk index: a folder with ``manifest.json``, ``features.h5`` and the faiss file.

``features.h5`` holds, row-aligned: ``names`` (as in the file list), ``paths`` (absolute, for display),
``labels``, ``file_size``, ``file_mtime`` and either ``descriptors`` (float32, N x D) or ``codes``
(uint8, N x bits/8). It is written row batch by row batch while extraction runs (a crash loses at most
the current batch) inside a work folder; the finished index is moved into place by renames, so a
reader never sees half an index.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CbirError, IndexDamaged

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.h5"
FAISS_FILES = {"cosine": "cosine.faiss", "hamming": "hamming.faiss"}
STATE_FILE = "extractor.h5"
LOCAL_FILE = "local.h5"
#: files a build writes into an index folder (besides ``NAME.h5`` copies of bundled files, see ``owned_name``)
#: the pointer file of an index whose vectors are in Milvus (cbir.index.milvus), in place of the faiss file
MILVUS_FILE = "milvus.json"
OWNED_FILES = {MANIFEST, FEATURES, STATE_FILE, LOCAL_FILE, MILVUS_FILE, *FAISS_FILES.values()}
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class WriteError(CbirError):
    """A file could not be written (disk full, read-only, permission): names the file and the space involved."""


class Locked(CbirError):
    """Another process holds the build lock of this index (the service answers 409)."""


class Kept(CbirError):
    """The new index could not be moved into place and is kept in the work folder, as the message says."""


def _existing_parent(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def write_error(path: os.PathLike, err: OSError, needed: Optional[int] = None) -> WriteError:
    """A one-line error for an OSError met while writing ``path``."""
    path = Path(path)
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(_existing_parent(path)).free
            room = f"{_mb(free)} free"
        except OSError:
            room = "free space unknown"
        need = f", about {_mb(needed)} needed" if needed else ""
        return WriteError(f"{path}: no space left on device ({room}{need}); free some space or choose another --out")
    if code == errno.EROFS:
        return WriteError(f"{path}: read-only file system; choose another --out")
    if code in (errno.EACCES, errno.EPERM):
        return WriteError(f"{path}: permission denied; choose another --out")
    return WriteError(f"{path}: cannot write ({getattr(err, 'strerror', None) or err})")


class _SafeFile(io.RawIOBase):
    """A binary file for h5py's and faiss's writers whose first OSError is kept instead of raised.

    HDF5 left in an error state by a failed write (errno 28) crashed the interpreter at exit (signal 11,
    measured); through this object every write "succeeds" for the library, which closes cleanly, and the
    caller raises the kept error afterwards as a one-line :class:`WriteError`.
    """

    def __init__(self, raw) -> None:
        super().__init__()
        self.raw = raw
        self.error: Optional[OSError] = None
        self.attempted = 0

    def write(self, b) -> int:
        m = memoryview(b).cast("B")
        n = len(m)
        self.attempted += n
        if self.error is None:
            done = 0
            try:
                while done < n:
                    k = self.raw.write(m[done:])
                    if not k:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                    done += k
            except OSError as e:
                self.error = e
        return n

    def readinto(self, b) -> int:
        return self.raw.readinto(b)

    def seek(self, pos, whence=0) -> int:
        return self.raw.seek(pos, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def truncate(self, size=None) -> int:
        try:
            return self.raw.truncate(size)
        except OSError as e:
            self.error = self.error or e
            return self.raw.tell() if size is None else size

    def flush(self) -> None:
        if self.error is None:
            try:
                self.raw.flush()
                os.fsync(self.raw.fileno())
            except OSError as e:
                self.error = e

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True


@contextlib.contextmanager
def writing(path: os.PathLike, mode: str = "wb") -> Iterator[_SafeFile]:
    """Write ``path`` atomically (``path.tmp`` then rename) through a :class:`_SafeFile`; any OSError becomes a
    :class:`WriteError` after the temporary file is removed, so a failed write leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        raw = open(tmp, "w+b", buffering=0)
    except OSError as e:
        raise write_error(tmp, e) from None
    sf = _SafeFile(raw)
    ok = False
    try:
        yield sf
        sf.flush()
        ok = sf.error is None
    finally:
        raw.close()
        if not ok:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if sf.error is not None:  # the temporary file is gone; say what failed
        raise write_error(path, sf.error, needed=sf.attempted)
    try:
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise write_error(path, e) from None


@contextlib.contextmanager
def h5_writing(path: os.PathLike):
    """A new HDF5 file at ``path``, written atomically; disk-full and read-only targets give a :class:`WriteError`."""
    h5py = _h5py()
    path = Path(path)
    with writing(path) as sf:
        f = h5py.File(sf, "w")
        try:
            yield f
        finally:
            f.close()


def write_faiss(index, path: os.PathLike, binary: bool = False) -> None:
    """``faiss.write_index`` streamed through :func:`writing` (atomic, disk errors as one line)."""
    import faiss

    path = Path(path)
    with writing(path) as sf:
        writer = faiss.PyCallbackIOWriter(sf.write)
        (faiss.write_index_binary if binary else faiss.write_index)(index, writer)
        del writer


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
    """Appends rows to an open HDF5 file (``h5py.File``) with resizable datasets."""

    def __init__(self, f, dim: int, dtype: str, key: str = "descriptors", attrs: Optional[dict] = None) -> None:
        self.f = f
        self.key = key
        if key not in self.f:
            s = _str_dtype()
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
    finished segment is a complete file. Segments written under another extractor key are ignored.
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
        with h5_writing(final) as f:
            FeatureWriter(f, rows.values.shape[1], "f4", key="raw", attrs={"key": self.key}).append(rows)
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


#: the manifest's own checksum: SHA-256 of the canonical JSON of every other field (``manifest_digest``)
MANIFEST_SUM = "manifest_sha256"


def _canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def manifest_digest(m: Dict[str, Any]) -> str:
    """The checksum a manifest records of itself: its fields but this one, as canonical JSON."""
    return _canonical_sha256({k: v for k, v in m.items() if k != MANIFEST_SUM})


def check_manifest(m: Dict[str, Any], folder: os.PathLike) -> None:
    """A manifest edited after it was written is damage: its own checksum (when recorded: an index of an older cbir has
    none) and the extractor's ``key_nostate``, the digest of its name, conf and weights (``Extractor.key(with_state=False)``),
    must match what it holds. (``key`` also covers a learned state that may be refined after it was taken: the state
    file's own checksum guards that.) Checked before anything is opened from it."""
    if MANIFEST_SUM in m and m[MANIFEST_SUM] != manifest_digest(m):
        raise damaged(folder, MANIFEST, "checksum mismatch: edited since it was written", m)
    ext = m["extractor"]
    ident = {k: v for k, v in ext.items() if k not in ("key", "key_nostate", "state")}
    try:
        key = _canonical_sha256(ident)[:16]
    except (TypeError, ValueError):
        raise damaged(folder, MANIFEST, "the extractor record is not plain JSON", m) from None
    if key != ext["key_nostate"]:
        raise damaged(folder, MANIFEST, f"extractor key {ext['key_nostate']} does not match its recorded conf (edited?)", m)


def write_json_atomic(obj, path: os.PathLike) -> None:
    """JSON written to ``path.tmp`` and renamed; NaN/Infinity are refused (they are not JSON). An index manifest gets
    its own checksum (``MANIFEST_SUM``) here."""
    if Path(path).name == MANIFEST and isinstance(obj, dict) and "format_version" in obj:
        obj = {**obj, MANIFEST_SUM: manifest_digest(obj)}
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    with writing(path) as f:
        f.write(text.encode("utf-8"))


def _old_folders(folder: Path) -> List[Path]:
    """``FOLDER.old-PID-TIME`` folders that :func:`commit_folder` moved aside, newest first."""
    pat = re.compile(re.escape(folder.name) + r"\.old-(\d+)-(\d+)$")
    try:
        found = [(int(mt.group(2)), p) for p in folder.parent.iterdir() if (mt := pat.match(p.name)) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return [p for _, p in sorted(found, key=lambda t: (t[0], t[1].name), reverse=True)]


def _complete_index(folder: Path) -> bool:
    """A folder holding a whole index: a valid manifest whose every recorded file is there with its size and SHA-256."""
    if not is_index_folder(folder):
        return False
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        validate_manifest(m, folder / MANIFEST)
        check_manifest(m, folder)
        for name in (m.get("files") or {}):
            verify_file(folder, name, m, full=True)
    except (CbirError, OSError, ValueError, KeyError, TypeError):
        return False
    return bool(m.get("files"))


def recover(folder: os.PathLike, wait_s: float = 10.0) -> Optional[Path]:
    """Put an index back at ``folder`` when a process died between the two renames of :func:`commit_folder` (``folder``
    missing, the new index complete in ``FOLDER.partial/commit``, the old one in ``FOLDER.old-PID-TIME``): the committed
    index when it is whole, else the newest old one; the superseded old folder is removed then (cbir made it).

    Runs under the build lock: while an update holds it (its own swap in progress) this waits up to ``wait_s`` for the
    folder to come back. Returns the folder that was moved into place, None when there was nothing to do."""
    folder = Path(os.path.abspath(folder))
    try:
        if folder.is_symlink() or (folder.exists() and (not folder.is_dir() or any(folder.iterdir()))):
            return None  # there is something at FOLDER (an index, or what check_out refuses)
    except OSError:
        return None
    work = partial_dir(folder)
    if not ((work / "commit" / MANIFEST).is_file() or _old_folders(folder)):
        return None
    lock = BuildLock(work, folder) if work.is_dir() else None
    deadline = time.monotonic() + max(0.0, wait_s)
    while lock is not None:
        try:
            lock.acquire()
            break
        except WriteError:
            lock = None  # a work folder that cannot take a lock (read-only): nobody else can write here either
        except Locked:
            if (folder / MANIFEST).exists():
                return None  # the holder finished its swap
            if time.monotonic() >= deadline:
                raise CbirError(f"{folder}: missing while another process holds the lock of {work}: an update is "
                                "replacing it; try again in a moment") from None
            time.sleep(0.05)
    try:
        if (folder / MANIFEST).exists():
            return None
        olds = _old_folders(folder)
        commit = work / "commit"
        pick = commit if _complete_index(commit) else next((o for o in olds if _complete_index(o)), None)
        if pick is None:
            return None
        try:
            if folder.is_dir():
                folder.rmdir()  # empty (checked above)
            os.replace(pick, folder)
        except OSError as e:
            raise CbirError(f"{folder}: missing after an interrupted update, and {pick} cannot be moved back in its place "
                            f"({e.strerror}); move it there yourself") from None
        for o in olds:
            if o != pick and is_index_folder(o):
                shutil.rmtree(o, ignore_errors=True)
        return pick
    finally:
        if lock is not None:
            lock.release()


def read_manifest(folder: os.PathLike) -> dict:
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.is_file():
        recover(folder)
    if not p.is_file():
        hint = ""
        if partial_dir(folder).exists():
            hint = f" (an unfinished build is in {partial_dir(folder)}: run the same `cbir index build` again to resume)"
        elif not folder.exists():
            hint = " (folder not found)"
        raise CbirError(f"{folder}: not a cbir index, no {MANIFEST}{hint}")
    try:
        m = json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexDamaged(f"{p}: damaged (not valid JSON: {e}) — rebuild the index") from None
    except OSError as e:
        raise IndexDamaged(f"{p}: cannot read ({e.strerror})") from None
    v = m.get("format_version") if isinstance(m, dict) else None
    if v != FORMAT_VERSION:
        raise CbirError(f"{p}: index format version {v!r}, this cbir reads version {FORMAT_VERSION}; rebuild the index")
    validate_manifest(m, p)
    check_manifest(m, folder)
    return m


def partial_dir(folder: os.PathLike) -> Path:
    """Where an unfinished build of ``folder`` keeps its work (beside it, so ``folder`` is never half-written)."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".partial")


def owned_name(name: str) -> bool:
    """Whether an entry of an index folder is one a build writes (``NAME.h5`` copies of bundled files included)."""
    return name in OWNED_FILES or (name.endswith(".h5") and _PLAIN_NAME.match(name) is not None) or name.endswith(".tmp")


def is_index_folder(folder: Path) -> bool:
    """A folder holding a cbir manifest and nothing a build did not write."""
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(m, dict) or "format_version" not in m or "extractor" not in m:
        return False
    return all(p.is_file() and owned_name(p.name) for p in folder.iterdir())


def _is_within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def foreign_entry(folder: Path) -> Optional[str]:
    """The name of an entry of an index folder that a build did not write (a stray file, a sub-folder), or None."""
    try:
        return next((p.name for p in sorted(Path(folder).iterdir()) if not (p.is_file() and not p.is_symlink() and owned_name(p.name))), None)
    except OSError:
        return None


def check_out(out: os.PathLike, images: Sequence[os.PathLike] = (), roots: Sequence[os.PathLike] = ()) -> Path:
    """Refuse an ``--out`` whose replacement could destroy what cbir did not write; returns the absolute path.

    Accepted: a path that does not exist, an empty folder, or a cbir index folder (replaced as a whole when
    the new one is complete). Refused with a one-line error: ``.``, the working folder or a parent of it, a
    file, a folder holding other files, and a folder that is (or holds) the gallery root or a listed image.
    """
    raw = str(out)
    if raw.strip() in ("", ".", "./", ".."):
        raise CbirError(f"--out {raw!r}: name a new folder for the index (e.g. indexes/NAME), not the working folder")
    p = Path(os.path.abspath(os.path.expanduser(raw)))
    cands = {str(p), os.path.realpath(p)}
    cwd = {os.path.abspath(os.getcwd()), os.path.realpath(os.getcwd())}
    if any(_is_within(c, o) for c in cwd for o in cands):
        raise CbirError(f"{p}: is the working folder or a parent of it; refusing to use it as --out (name a new folder)")
    for r in roots:
        rr = {os.path.abspath(r), os.path.realpath(r)}
        if any(_is_within(x, o) for x in rr for o in cands):
            raise CbirError(f"{p}: holds the gallery's root folder {r}; refusing to replace it with an index (name a new folder)")
    for img in images:
        ia = os.path.abspath(img)
        if any(_is_within(ia, o) for o in cands):
            raise CbirError(f"{p}: holds listed image {img}; refusing to replace it with an index (name a new folder)")
    recover(p)  # an update killed in the middle of its swap: the index it left is put back first (its rows are reused)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise CbirError(f"{p}: exists and is not a folder; refusing to replace it with an index")
    if p.is_dir():
        try:
            entries = list(p.iterdir())
        except OSError as e:
            raise CbirError(f"{p}: cannot read the folder ({e.strerror})") from None
        if entries and not is_index_folder(p):
            other = next((e.name for e in entries if not owned_name(e.name) or not e.is_file()), entries[0].name)
            raise CbirError(f"{p}: holds files that are not a cbir index (e.g. {other}); refusing to replace it "
                            "(choose a new --out, or an existing index folder)")
    return p


def claim_work(work: Path, out: Path) -> None:
    """Create (or reuse) the work folder ``OUT.partial``; one that cbir did not make is refused, never cleared."""
    work = Path(work)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise CbirError(f"{work}: exists and is not a cbir work folder; move it away to build {out}")
    if work.is_dir():
        names = {p.name for p in work.iterdir()}
        if names and not names & {"work.json", BuildLock.NAME}:
            raise CbirError(f"{work}: exists and was not made by cbir (no work.json); move it away to build {out}")
        return
    try:
        work.mkdir(parents=True)
    except OSError as e:
        raise write_error(work, e) from None


def clear_work(work: Path) -> None:
    """Empty a work folder of another extractor's work, keeping the lock file of the running build."""
    for p in Path(work).iterdir():
        if p.name == BuildLock.NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_space(folder: os.PathLike, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes under ``folder`` when its file system has less free space."""
    try:
        free = shutil.disk_usage(_existing_parent(Path(folder))).free
    except OSError:
        return
    if free < needed:
        raise WriteError(f"{folder}: not enough space for {what}: about {_mb(needed)} needed, {_mb(free)} free; "
                         "free some space or choose another --out")


def fresh_folder(path: Path) -> Path:
    """An empty folder at ``path`` (inside a work folder cbir owns): what was there is removed first."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir()
    except OSError as e:
        raise write_error(path, e) from None
    return path


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


class BuildLock:
    """An exclusive lock on a build's work folder (``flock`` on ``build.lock``): a second build into the same
    ``--out`` stops at once, naming the process that holds it. The OS drops the lock when that process dies,
    so a killed build never blocks the next one."""

    NAME = "build.lock"

    def __init__(self, work: Path, out: Path) -> None:
        self.path = Path(work) / self.NAME
        self.out = out
        self.fd: Optional[int] = None

    def acquire(self) -> "BuildLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, builds are not guarded
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise Locked(f"another build (pid {pid}) is writing {self.out}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def commit_folder(work: Path, final: Path) -> None:
    """Move the finished ``work`` folder to ``final``; an existing index there is replaced as a whole.

    Only an empty folder or a cbir index folder is ever replaced (``check_out`` refused anything else before
    the build; checked again here, since the folder may have changed during a long build).
    """
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise Kept(f"{final}: is no longer a folder; the new index is kept in {work}")
    if final.is_dir() and any(final.iterdir()) and not is_index_folder(final):
        raise Kept(f"{final}: files that are not a cbir index appeared during the build; the new index is kept in {work}")
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


# ----------------------------------------------------------------------------- checksums and verification


def file_sha256(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: os.PathLike) -> Dict[str, Any]:
    """What the manifest keeps of each index file: its size and SHA-256."""
    return {"bytes": int(os.path.getsize(path)), "sha256": file_sha256(path)}


_VERIFIED: Dict[Tuple[str, int, int, int, str], bool] = {}


def rebuild_hint(manifest: Dict[str, Any], folder: os.PathLike) -> str:
    ds = manifest.get("dataset") if isinstance(manifest.get("dataset"), dict) else {}
    ext = manifest.get("extractor") if isinstance(manifest.get("extractor"), dict) else {}
    if ds.get("name"):
        src = f"--dataset {ds['name']}" + (f" --split {ds['split']}" if ds.get("split") else "")
    elif ds.get("list"):
        src = f"--list {ds['list']}" + (f" --root {ds['root']}" if ds.get("root") else "")
    else:
        src = "--list FILE"
    name = ext.get("name") if isinstance(ext.get("name"), str) else None
    return f"cbir index build {src}" + (f" --extractor {name}" if name else "") + f" --out {folder}"


def damaged(folder: os.PathLike, name: str, cause: str, manifest: Optional[Dict[str, Any]] = None) -> CbirError:
    """``DIR/FILE: damaged (cause) — rebuild with ...``"""
    hint = rebuild_hint(manifest or {}, folder)
    return IndexDamaged(f"{Path(folder) / name}: damaged ({cause}) — rebuild with `{hint}`")


def verify_file(folder: os.PathLike, name: str, manifest: Dict[str, Any], full: bool = True) -> None:
    """Check one index file against the manifest's record (size always, SHA-256 when ``full``).

    A file already verified in this process (same inode, size and mtime) is not hashed again.
    """
    rec = (manifest.get("files") or {}).get(name)
    path = Path(folder) / name
    if rec is None:
        if path.exists():
            return  # an index written before checksums were recorded
        raise damaged(folder, name, "missing", manifest)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise damaged(folder, name, "missing", manifest) from None
    if st.st_size != rec["bytes"]:
        raise damaged(folder, name, f"{st.st_size} bytes, the manifest records {rec['bytes']}", manifest)
    if not full:
        return
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, rec["sha256"])
    if _VERIFIED.get(key):
        return
    if file_sha256(path) != rec["sha256"]:
        raise damaged(folder, name, "checksum mismatch: the bytes changed since the build", manifest)
    _VERIFIED[key] = True


def open_checked(folder: os.PathLike, name: str, manifest: Dict[str, Any], opener, verify: bool = True):
    """``opener(path)`` for index file ``name`` after :func:`verify_file`; a read error becomes a one-line
    :class:`IndexDamaged` naming the file (h5py raises OSError/KeyError, faiss RuntimeError)."""
    verify_file(folder, name, manifest, full=verify)
    try:
        return opener(Path(folder) / name)
    except CbirError as e:
        raise damaged(folder, name, str(e).split(": ", 1)[-1], manifest) from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise damaged(folder, name, f"unreadable: {first}", manifest) from None


# ----------------------------------------------------------------------------- manifest schema


KINDS = ("float", "binary")
METRICS = ("cosine", "hamming")
ANNS = ("flat", "hnsw", "ivf")
MAX_DIM = 1 << 20
MAX_COUNT = 1 << 40


def _fail(p: Path, what: str) -> CbirError:
    return IndexDamaged(f"{p}: invalid manifest ({what}) — rebuild the index")


def validate_manifest(m: Any, p: Path) -> Dict[str, Any]:
    """Check the manifest's types, bounds and file names before anything is opened or allocated from it."""
    if not isinstance(m, dict):
        raise _fail(p, "not a JSON object")

    def need(key, types, check=None, what=""):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, types):
            raise _fail(p, f"{key!r} must be {what or types}")
        if check is not None and not check(v):
            raise _fail(p, f"{key!r} is {str(v)[:60]!r}, must be {what or 'in range'}")
        return v

    ext = need("extractor", dict, what="an object")
    for k in ("name", "key", "key_nostate"):
        if not isinstance(ext.get(k), str) or not ext[k] or len(ext[k]) > 200:
            raise _fail(p, f"extractor.{k} must be a non-empty string")
    if not isinstance(ext.get("conf"), dict):
        raise _fail(p, "extractor.conf must be an object")
    if not isinstance(ext.get("weights", {}), dict) or not all(isinstance(v, str) for v in ext.get("weights", {}).values()):
        raise _fail(p, "extractor.weights must map names to SHA-256 strings")
    for k, v in ext["conf"].items():
        if isinstance(v, str) and v.startswith("@") and (v != f"@{k}" or not _PLAIN_NAME.match(k)):
            raise _fail(p, f"extractor.conf.{k} refers to {v!r}: a bundled file must be '@{{its own plain key}}'")
    kind = need("kind", str, lambda v: v in KINDS, f"one of {KINDS}")
    need("dim", int, lambda v: 1 <= v <= MAX_DIM, f"an integer in 1..{MAX_DIM}")
    metric = need("metric", str, lambda v: v in METRICS, f"one of {METRICS}")
    if (kind == "binary") != (metric == "hamming"):
        raise _fail(p, f"kind {kind!r} does not go with metric {metric!r}")
    if metric == "hamming":
        need("code_bits", int, lambda v: 8 <= v <= MAX_DIM and v % 8 == 0, "a multiple of 8")
    vstore = m.get("store")
    if vstore is not None and (not isinstance(vstore, dict) or vstore.get("kind") != "milvus" or not isinstance(vstore.get("uri"), str)
                               or not isinstance(vstore.get("collection"), str)):
        raise _fail(p, "'store' must be null or {kind: milvus, uri, collection}")
    search_file = MILVUS_FILE if vstore is not None else FAISS_FILES[metric]
    need("faiss", str, lambda v: v == search_file, f"{search_file!r} for metric {metric}" + (" in a Milvus store" if vstore else ""))
    need("ann", str, lambda v: v in ANNS, f"one of {ANNS}")
    need("count", int, lambda v: 0 <= v <= MAX_COUNT, "a non-negative integer")
    if not isinstance(m.get("labels", []), list):
        raise _fail(p, "'labels' must be a list")
    if not isinstance(m.get("label_names", {}) or {}, dict):
        raise _fail(p, "'label_names' must be an object")
    local = m.get("local")
    if local is not None and (not isinstance(local, dict) or not isinstance(local.get("name"), str)):
        raise _fail(p, "'local' must be null or an object with a name")
    search = m.get("search")
    if search is not None:
        if not isinstance(search, dict) or search.get("metric") != metric:
            raise _fail(p, "'search' must be an object for the same metric")
        for k in ("dim_in", "dim", "code_bytes", "nlist", "nprobe", "ef", "hnsw_m"):
            v = search.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM * 16):
                raise _fail(p, f"search.{k} must be a positive integer")
        removed = search.get("removed", [])
        if not isinstance(removed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in removed):
            raise _fail(p, "search.removed must be a list of image ids")
        for k, allowed in (("codec", ("float32", "float16", "sq8", "pq")), ("ann", ANNS)):
            if search.get(k) not in allowed:
                raise _fail(p, f"search.{k} must be one of {allowed}")
    if "next_id" in m and (isinstance(m["next_id"], bool) or not isinstance(m["next_id"], int) or m["next_id"] < 0):
        raise _fail(p, "'next_id' must be a non-negative integer")
    files = m.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise _fail(p, "'files' must be an object")
        for name, rec in files.items():
            if not _PLAIN_NAME.match(name) or name == MANIFEST:
                raise _fail(p, f"file name {name[:60]!r} is not a plain name inside the index folder")
            if (not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or rec["bytes"] < 0
                    or not isinstance(rec.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])):
                raise _fail(p, f"files.{name} must hold bytes and a SHA-256")
    return m


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def unique_names(names: Sequence[str]) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise CbirError(f"image {n!r} appears twice in the list")
        seen.add(n)


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
