"""``cbir index sync``: keep an index built from a folder in step with it (new, changed and deleted files).

A file is unchanged when its size and mtime are those stored at extraction (or at its last content check);
otherwise its SHA-256 is compared with the one recorded in the index's ``content.h5`` (a touched but identical file is
not extracted again, its new size/mtime are recorded). Deleted and changed files go through
:func:`cbir.update.remove_images`, new and changed ones through :func:`cbir.update.add_images`: the same functions
as ``index add`` / ``index remove``, so each step is atomic and locked and everything kept beside the vectors follows.
A journal beside the index (``INDEX.sync.json``) carries what a killed sync had planned, so the next one finishes it
and still reports the changed files as changed. A sync with nothing to do reads no image (it decodes none).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import Entry, file_stat
from .errors import CbirError
from .folders import FolderScan, scan_folder
from .index.atomic import write_json_atomic
from .index.folder import commit_folder, fresh_folder, locked_update, read_manifest
from .index.manifest import FEATURES, MANIFEST, now_iso, write_manifest
from .index.rows import read_rows, str_dtype, write_arrays
from .index.verify import file_sha256
from .progress import bar as _progress, log as _log
from .update import add_images, remove_images

PathLike = Union[str, os.PathLike]

#: The index file holding each gallery file's SHA-256 and the size/mtime it was taken at.
CONTENT_FILE = "content.h5"


@dataclass
class SyncReport:
    index: Path
    folder: Path
    count: int = 0
    added: List[str] = field(default_factory=list)
    changed: List[str] = field(default_factory=list)
    removed: List[str] = field(default_factory=list)
    failed: List[Dict[str, str]] = field(default_factory=list)
    unchanged: int = 0
    touched: List[str] = field(default_factory=list)  # size/mtime differed, content the same: not extracted again
    hashed: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    seconds: float = 0.0

    def as_json(self) -> Dict[str, Any]:
        return {"index": str(self.index), "folder": str(self.folder), "count": self.count, "added": self.added,
                "changed": self.changed, "removed": self.removed, "failed": self.failed, "unchanged": self.unchanged,
                "touched": self.touched, "hashed": self.hashed, "skipped": self.skipped, "dry_run": self.dry_run,
                "seconds": self.seconds}


# ----------------------------------------------------------------------------- content hashes


def read_content(folder: PathLike) -> Dict[str, Tuple[str, int, float]]:
    """``name -> (sha256, size, mtime)`` recorded in an index's content.h5 ({} when it has none)."""
    p = Path(folder) / CONTENT_FILE
    if not p.is_file():
        return {}
    rows, _ = read_rows(p)
    return {str(n): (str(h), int(s), float(t)) for n, h, s, t in zip(rows["names"], rows["sha256"], rows["file_size"], rows["file_mtime"])}


def write_content(folder: PathLike, content: Dict[str, Tuple[str, int, float]]) -> None:
    """Record ``content`` as the index's content.h5 in a new folder moved into place (atomic, under the update lock);
    the other files are hard links (copies where links fail), their manifest records unchanged."""
    folder = Path(folder)

    def run(work: Path) -> None:
        m = read_manifest(folder)
        commit = fresh_folder(work / "commit")
        for p in sorted(folder.iterdir()):
            if not p.is_file() or p.name in (MANIFEST, CONTENT_FILE):
                continue
            try:
                os.link(p, commit / p.name)
            except OSError:
                import shutil

                shutil.copy2(p, commit / p.name)
        names = sorted(content)
        str_dt = str_dtype()
        write_arrays(commit / CONTENT_FILE, {
            "names": np.array(names, dtype=object).astype(str_dt), "sha256": np.array([content[n][0] for n in names], dtype=object).astype(str_dt),
            "file_size": np.array([content[n][1] for n in names], np.int64), "file_mtime": np.array([content[n][2] for n in names], np.float64)})
        known = {k: v for k, v in (m.get("files") or {}).items() if k != CONTENT_FILE}  # hard links: the same bytes
        write_manifest(commit, {}, base=m, known=known)
        commit_folder(commit, folder)

    locked_update(folder, run)


def hash_files(entries: Sequence[Entry], progress: bool = True, desc: str = "content hashes") -> Dict[str, Tuple[str, int, float]]:
    """SHA-256, size and mtime of each entry's file (names of unreadable files are left out)."""
    out: Dict[str, Tuple[str, int, float]] = {}
    pb = _progress(total=len(entries), desc=desc, enabled=progress and len(entries) > 0)
    for e in entries:
        size, mtime = file_stat(e.path)
        try:
            out[e.name] = (file_sha256(e.path), size, mtime)
        except OSError as err:
            _log(f"warning: {e.path}: cannot read ({err.strerror})", pb)
        pb.update()
    pb.close()
    return out


# ----------------------------------------------------------------------------- sync


def _journal(index: Path) -> Path:
    return index.with_name(index.name + ".sync.json")


def _gallery_rows(index: Path) -> Tuple[dict, List[str], np.ndarray, np.ndarray]:
    m = read_manifest(index)
    rows, _ = read_rows(index / FEATURES, lazy=("descriptors", "codes", "raw"))
    return m, [str(n) for n in rows["names"]], np.asarray(rows["file_size"], np.int64), np.asarray(rows["file_mtime"], np.float64)


def sync_index(index: PathLike, folder: Optional[PathLike] = None, labels: Optional[str] = "auto", batch_size: int = 16,
               workers: int = 2, progress: bool = True, dry_run: bool = False) -> SyncReport:
    """Bring ``index`` (built from a folder) in step with ``folder`` (default: the folder it was built from).

    ``labels``: ``"auto"`` (the index's own ``--labels`` at build), None or ``"folder"``. Returns what was done
    (names relative to the folder); with ``dry_run`` only what would be.
    """
    t0 = time.time()
    index = Path(index)
    m, names, sizes, mtimes = _gallery_rows(index)
    ds = m.get("dataset") if isinstance(m.get("dataset"), dict) else {}
    if folder is None:
        if not ds.get("folder"):
            raise CbirError(f"{index}: was not built from a folder (its images came from {_source(ds)}); name the folder: "
                            "cbir index sync INDEX FOLDER")
        folder = ds["folder"]
    if labels == "auto":
        labels = ds.get("labels") if ds.get("folder") else None
    scan: FolderScan = scan_folder(folder, labels=labels)
    rep = SyncReport(index=index, folder=scan.root, skipped=dict(scan.skipped), dry_run=dry_run)
    in_folder = {e.name: e for e in scan.entries}
    if names and not scan.entries:  # an unmounted drive, a wrong path: never a reason to empty the index
        raise CbirError(f"{scan.root}: holds no images, and {index} holds {len(names)}; nothing was changed (is the folder "
                        "mounted?). To empty the index, remove its images with `cbir index remove`")
    if names and scan.entries and not any(n in in_folder for n in names):
        raise CbirError(f"{scan.root}: holds none of the {len(names)} images of {index} (names relative to the folder, e.g. "
                        f"{names[0]}); is it the folder the index was built from? Build a new index instead")
    pos = {n: i for i, n in enumerate(names)}
    content = read_content(index)
    recorded = dict(content)
    journal = _journal(index)
    planned_changed = set()
    if journal.is_file():
        try:
            planned_changed = set(json.loads(journal.read_text(encoding="utf-8")).get("changed") or [])
        except (OSError, ValueError):
            planned_changed = set()

    new, gone, suspect, unhashed = [], [], [], []
    for e in scan.entries:
        i = pos.get(e.name)
        if i is None:
            new.append(e)
            continue
        st = file_stat(e.path)
        c = content.get(e.name)
        if st == (int(sizes[i]), float(mtimes[i])) or (c is not None and st == (c[1], c[2])):
            rep.unchanged += 1
            if c is None:
                unhashed.append(e)
        else:
            suspect.append(e)
    gone = [n for n in names if n not in in_folder]

    changed: List[Entry] = []
    hashes: Dict[str, Tuple[str, int, float]] = {}
    if suspect:
        hashes = hash_files(suspect, progress=progress, desc="sync: content of changed files")
        rep.hashed += len(hashes)
        for e in suspect:
            h, c = hashes.get(e.name), content.get(e.name)
            if h is not None and c is not None and h[0] == c[0]:
                rep.touched.append(e.name)
                rep.unchanged += 1
                content[e.name] = h
            else:
                changed.append(e)
    resumed = [e for e in new if e.name in planned_changed]
    rep.added = [e.name for e in new if e.name not in planned_changed]
    rep.changed = sorted({e.name for e in changed} | {e.name for e in resumed})
    rep.removed = gone
    if dry_run:
        rep.count = len(names) - len(gone) + len(new)
        rep.seconds = round(time.time() - t0, 3)
        return rep

    work_needed = bool(gone or changed or new)
    if work_needed:
        write_json_atomic({"folder": str(scan.root), "changed": rep.changed, "started": now_iso()}, journal)
    if gone or changed:
        remove_images(index, gone + [e.name for e in changed], log=lambda msg: None)
    to_add = new + changed
    if to_add:
        try:
            ar = add_images(index, to_add, batch_size=batch_size, workers=workers, progress=progress)
            failures = ar.failures
        except CbirError as err:
            if not str(err).startswith("none of the"):
                raise
            failures = [{"name": e.name, "path": str(e.path), "cause": str(err)} for e in to_add]
        bad = {f.get("name") for f in failures}
        rep.failed = [{"name": f.get("name"), "path": f.get("path"), "cause": f.get("cause")} for f in failures]
        rep.added = [n for n in rep.added if n not in bad]
        rep.changed = [n for n in rep.changed if n not in bad]
        # the contents of what is now in the index (files hashed above are not read again)
        fresh = [e for e in to_add if e.name not in bad]
        content.update({e.name: hashes[e.name] for e in fresh if e.name in hashes})
        todo = [e for e in fresh if e.name not in hashes]
        got = hash_files(todo, progress=progress, desc="sync: content hashes")
        rep.hashed += len(got)
        content.update(got)
    for n in gone + [f["name"] for f in rep.failed]:
        content.pop(n, None)
    if unhashed:  # files extracted at build, first sync: their content, so a later touch needs no extraction
        got = hash_files(unhashed, progress=progress, desc="sync: content of the gallery")
        rep.hashed += len(got)
        content.update(got)
    if content != recorded:
        write_content(index, content)
    if work_needed:
        try:
            journal.unlink()
        except OSError:
            pass
    rep.count = int(read_manifest(index)["count"])
    rep.seconds = round(time.time() - t0, 3)
    return rep


def _source(ds: Dict[str, Any]) -> str:
    if ds.get("list"):
        return f"the list {ds['list']}"
    if ds.get("name"):
        return f"the dataset {ds['name']}"
    return "a list"
