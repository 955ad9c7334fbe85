"""Atomic writes: a file appears whole under its name or not at all, and a disk error is one line naming the file.

Every file of an index folder is written through :func:`writing` (``NAME.tmp`` then a rename); h5py and faiss write
through a :class:`SafeFile`, which keeps the first OSError instead of raising it inside the library.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from ..errors import CbirError


class WriteError(CbirError):
    """A file could not be written (disk full, read-only, permission): names the file and the space involved."""


def existing_parent(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def megabytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def write_error(path: os.PathLike, err: OSError, needed: Optional[int] = None) -> WriteError:
    """A one-line error for an OSError met while writing ``path``."""
    path = Path(path)
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = shutil.disk_usage(existing_parent(path)).free
            room = f"{megabytes(free)} free"
        except OSError:
            room = "free space unknown"
        need = f", about {megabytes(needed)} needed" if needed else ""
        return WriteError(f"{path}: no space left on device ({room}{need}); free some space or choose another --out")
    if code == errno.EROFS:
        return WriteError(f"{path}: read-only file system; choose another --out")
    if code in (errno.EACCES, errno.EPERM):
        return WriteError(f"{path}: permission denied; choose another --out")
    return WriteError(f"{path}: cannot write ({getattr(err, 'strerror', None) or err})")


class SafeFile(io.RawIOBase):
    """A binary file for h5py's and faiss's writers whose first OSError is kept instead of raised.

    HDF5 left in an error state by a failed write (errno 28) crashed the interpreter at exit (signal 11,
    measured); through this object every write "succeeds" for the library, which closes cleanly, and the
    caller raises the kept error afterwards as a one-line :class:`WriteError`.
    """

    def __init__(self, raw, durable: bool = True) -> None:
        super().__init__()
        self.raw = raw
        self.durable = durable  # flush() also fsyncs
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
                if self.durable:
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
def writing(path: os.PathLike, mode: str = "wb", durable: bool = True) -> Iterator[SafeFile]:
    """Write ``path`` atomically (``path.tmp`` then rename) through a :class:`SafeFile`; any OSError becomes a
    :class:`WriteError` after the temporary file is removed, so a failed write leaves nothing behind.

    ``durable=False`` skips the fsyncs: the file survives the process being killed (the kernel has it) but not
    always a power cut, which may leave it empty under its final name; for files a reader recomputes when it cannot
    read them (a build's row segments), not for an index's own files."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        raw = open(tmp, "w+b", buffering=0)
    except OSError as e:
        raise write_error(tmp, e) from None
    sf = SafeFile(raw, durable)
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
def h5_writing(path: os.PathLike, durable: bool = True):
    """A new HDF5 file at ``path``, written atomically; disk-full and read-only targets give a :class:`WriteError`
    (``durable``: as :func:`writing`'s)."""
    import h5py

    path = Path(path)
    with writing(path, durable=durable) as sf:
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


def write_json_atomic(obj, path: os.PathLike) -> None:
    """JSON written to ``path.tmp`` and renamed; NaN/Infinity are refused (they are not JSON). (An index manifest is
    written by :func:`cbir.index.manifest.write_manifest`, which adds its checksum.)"""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False)
    with writing(path) as f:
        f.write(text.encode("utf-8"))
