"""Checksums and verification: each index file against the size and SHA-256 its manifest records.

A damaged file is one line naming it (:func:`damaged`: ``DIR/FILE: damaged (cause) — rebuild with `...```), raised
before anything is read from it (:func:`verify_file`) or when the library reading it fails (:func:`open_checked`).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from ..errors import CbirError, IndexDamaged


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


def verify_file(folder: os.PathLike, name: str, manifest: Dict[str, Any], full: bool = True,
                path: Optional[os.PathLike] = None) -> None:
    """Check one index file against the manifest's record (size always, SHA-256 when ``full``).

    A file already verified in this process (same inode, size and mtime) is not hashed again. ``path``: where the
    file is read when not at ``folder/name`` (a descriptor held open, :meth:`cbir.index.gallery.Gallery.open_file`).
    """
    rec = (manifest.get("files") or {}).get(name)
    held = path is not None
    path = Path(path) if held else Path(folder) / name
    if not held and path.is_symlink():  # an index's files are its own: a link could point anywhere (outside the folder, a device)
        raise damaged(folder, name, f"a symbolic link to {os.readlink(path)}; an index file must be a plain file inside "
                      "the folder", manifest)
    if rec is None:
        if path.exists():
            return  # an index written before checksums were recorded
        raise damaged(folder, name, "missing", manifest)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise damaged(folder, name, "missing", manifest) from None
    if not stat.S_ISREG(st.st_mode):  # a folder, a pipe (reading it would block), a device
        raise damaged(folder, name, "not a regular file", manifest)
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


def open_checked(folder: os.PathLike, name: str, manifest: Dict[str, Any], opener, verify: bool = True,
                 path: Optional[os.PathLike] = None):
    """``opener(path)`` for index file ``name`` after :func:`verify_file`; a read error becomes a one-line
    :class:`IndexDamaged` naming the file (h5py raises OSError/KeyError, faiss RuntimeError)."""
    verify_file(folder, name, manifest, full=verify, path=path)
    try:
        return opener(Path(path) if path is not None else Path(folder) / name)
    except CbirError as e:
        raise damaged(folder, name, str(e).split(": ", 1)[-1], manifest) from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise damaged(folder, name, f"unreadable: {first}", manifest) from None


def check_sizes(folder: os.PathLike, manifest: Dict[str, Any]) -> None:
    """Every file the manifest records is there, a plain file of the recorded size (no byte is read): what a command
    checks of the files it does not read itself (:func:`verify_file` with ``full`` hashes the ones it reads)."""
    for name in sorted(manifest.get("files") or {}):
        verify_file(folder, name, manifest, full=False)
