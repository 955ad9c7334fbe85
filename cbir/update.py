"""Updates of a built index in place: add images, remove images, compact the search structure (each atomic)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .build import fit_rows
from .build.extract import extract_rows
from .data import Entry, dedupe
from .errors import CbirError, IndexMismatch
from .index import knn
from .index.backend import FaissBackend, SearchSpec, auto_spec
from .index.folder import check_space, commit_folder, fresh_folder, locked_update
from .index.manifest import FEATURES, LOCAL_FILE, next_id, write_manifest
from .index.rows import Rows, RowSegments, read_rows, write_features
from .index.verify import open_checked
from .progress import log as _log
from .query import Index

PathLike = Union[str, os.PathLike]


@dataclass
class UpdateReport:
    index: Path
    count: int
    added: int = 0
    removed: int = 0
    skipped: List[str] = field(default_factory=list)  # names already in the index / not found
    failures: List[Dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _rewrite(idx: "Index", work: Path, rows: Dict[str, np.ndarray], backend: FaissBackend, keep_local: Sequence[str],
             event: Dict[str, Any], new_local: Optional[Path] = None, new_names: Sequence[str] = ()) -> Dict[str, Any]:
    """Write ``idx``'s folder anew from ``rows`` and ``backend`` in ``work/commit`` and move it into place (atomic);
    local features: those of ``keep_local`` from the index, those of ``new_names`` from the file ``new_local``."""
    folder, m = idx.folder, idx.manifest
    commit = fresh_folder(work / "commit")
    extra = {k: rows[k] for k in ("ids", "codes", "raw") if k in rows}
    check_space(commit, sum(v.nbytes for v in rows.values() if isinstance(v, np.ndarray) and v.dtype != object) * 2 + (1 << 20),
                "the updated index")
    write_features(commit / FEATURES, Rows(list(rows["names"]), list(rows["paths"]), [None if l == "" else l for l in rows["labels"]],
                                           list(rows["file_size"]), list(rows["file_mtime"]), np.asarray(rows["descriptors"], np.float32)),
                   extra)
    backend.save(commit / m["faiss"])
    for name in (m.get("files") or {}):
        if name.endswith(".h5") and name not in (FEATURES, LOCAL_FILE, knn.GRAPH_FILE):
            shutil.copy2(folder / name, commit / name)  # learned state and bundled files: unchanged
    graph_note = _update_graph(idx, commit, rows, backend)
    if m.get("local"):
        from .local.store import LocalFeatureStore

        with LocalFeatureStore(commit / LOCAL_FILE, mode="a") as lw:
            lw.copy_from(folder / LOCAL_FILE, keep_local)
            if new_local is not None and new_local.is_file():
                lw.copy_from(new_local, new_names)
    labels = sorted({l for l in rows["labels"] if l != ""})
    manifest = write_manifest(commit, {"count": int(len(rows["names"])), "labels": labels, "search": backend.spec.to_json(),
                                       "next_id": next_id(m, rows["ids"])}, base=m, event={**event, **graph_note})
    commit_folder(commit, folder)
    return manifest


def _update_graph(idx: "Index", commit: Path, rows: Dict[str, np.ndarray], backend) -> Dict[str, Any]:
    """knn.h5 of the updated gallery (cbir/index/knn.py: only the neighbourhoods that change are searched again), for
    an index that stores one; returns what the history records of it."""
    rec = idx.manifest.get("knn")
    if not isinstance(rec, dict) or not rec.get("k"):
        return {}
    t0 = time.time()
    k = int(rec["k"])
    old_nbr, old_sims = open_checked(idx.folder, knn.GRAPH_FILE, idx.manifest, lambda p: knn.read(p, len(idx)), True)
    (nbr, sims), counts = knn.update(old_nbr, old_sims, idx.ids, np.asarray(rows["ids"], np.int64),
                                     np.asarray(rows["descriptors"], np.float32), backend.search, k)
    knn.write(commit / knn.GRAPH_FILE, nbr, sims)
    return {"graph": {**counts, "seconds": round(time.time() - t0, 3)}}


def _new_entries(idx: "Index", entries: Sequence[Entry]) -> Tuple[List[Entry], List[str]]:
    """``(entries to add, names already there)``: one file listed under several spellings (./x, x//y, absolute) or
    already indexed under another name is there."""
    new, _ = dedupe(entries)
    seen_files = set()
    present, fresh = [], []
    for e in new:
        resolved = str(Path(e.path).resolve())
        if idx.row(e.name) is not None or idx.row_of_path(resolved) is not None or resolved in seen_files:
            present.append(e.name)
        else:
            fresh.append(e)
        seen_files.add(resolved)
    return fresh, present


def _local_extractor(idx: "Index"):
    """The local-feature extractor of an index built with ``--local``, exactly as at build (None without)."""
    lm = idx.manifest.get("local")
    if not lm:
        return None
    from .local.store import make_local_extractor

    ident = lm.get("identity") or {}
    local_ext = make_local_extractor(lm["name"], {**(ident.get("conf") or {}), "max_side": ident.get("max_side")})
    if local_ext.key() != lm.get("key"):
        raise IndexMismatch(f"{idx.folder}: its local features ({lm['name']}) cannot be reproduced here (another "
                            "configuration or weights); rebuild the index to add images")
    return local_ext


def add_images(folder: PathLike, entries: Sequence[Entry], strict: bool = False, batch_size: int = 16, workers: int = 2,
               progress: bool = True, log: Callable[[str], None] = None) -> UpdateReport:
    """Extract only the images of ``entries`` not yet in the index, with the index's own extractor and learned state
    (the build's extraction phase, :func:`cbir.build.extract.extract_rows`), and append them under new stable ids.
    Atomic like a build; queries opened afterwards see them."""
    t0 = time.time()
    say = log or (lambda msg: _log(msg))

    def run(work: Path) -> UpdateReport:
        idx = Index(folder)
        ext = idx.extractor
        new, present = _new_entries(idx, entries)
        rep = UpdateReport(index=idx.folder, count=len(idx), skipped=present)
        if present:
            say(f"note: {len(present)} image(s) already in the index kept as they are, e.g. {present[0]}")
        if not new:
            return rep
        local_ext = _local_extractor(idx)

        def fail(e: Entry, cause: str, pb=None, what: Optional[str] = None) -> None:
            if strict:
                raise CbirError(f"--strict: {what or f'{e.path}: {cause}'} (nothing added)")
            rep.failures.append({"path": str(e.path), "name": e.name, "cause": cause})
            _log(f"skipped {e.path}: {cause}", pb)

        segments = RowSegments(fresh_folder(work / "rows"), idx.manifest["extractor"]["key"])
        new_local = work / "local-added.h5"
        local_writer = None
        if local_ext is not None:
            from .local.store import LocalFeatureStore

            local_writer = LocalFeatureStore(new_local, mode="a")
        try:
            extract_rows(ext, new, segments, fail, batch_size=batch_size, workers=workers, progress=progress,
                         local_ext=local_ext, local_writer=local_writer, desc=f"add: {ext.name}")
        finally:
            if local_writer is not None:
                local_writer.close()
        seg_files, loc, _ = segments.locate()
        got = [e for e in new if e.name in loc]  # in list order: the ids follow it
        if not got:
            first = rep.failures[0] if rep.failures else None
            eg = f" (e.g. {first['path']}: {first['cause']})" if first else ""
            raise CbirError(f"none of the {len(new)} new image(s) could be read{eg}; nothing added")
        raw = RowSegments.gather(seg_files, [loc[e.name][:2] for e in got])
        final = ext.post(raw)
        vectors = ext.encode(final) if idx.metric == "hamming" else final
        rows, _ = read_rows(idx.folder / FEATURES)
        if "ids" not in rows:
            rows["ids"] = idx.ids.copy()
        start = next_id(idx.manifest, rows["ids"])
        ids = np.arange(start, start + len(got), dtype=np.int64)
        add = {"names": [e.name for e in got], "paths": [str(e.path.resolve()) for e in got],
               "labels": ["" if e.label is None else str(e.label) for e in got], "file_size": [loc[e.name][2] for e in got],
               "file_mtime": [loc[e.name][3] for e in got], "descriptors": final.astype(np.float32), "ids": ids}
        if "codes" in rows:
            add["codes"] = vectors
        if "raw" in rows:
            add["raw"] = raw
        out = {k: np.concatenate([np.asarray(rows[k], dtype=object if rows[k].dtype == object else rows[k].dtype),
                                  np.asarray(v, dtype=object if rows[k].dtype == object else rows[k].dtype)]) for k, v in add.items()}
        backend = _writable_backend(idx)
        event = {"added": len(ids), "failures": len(rep.failures)}
        keep = [str(n) for n in idx.names]
        if idx.manifest.get("store"):  # Milvus: the collection changes first; undone if the folder cannot follow
            backend.add(ids, vectors, names=add["names"], labels=add["labels"])
            try:
                _rewrite(idx, work, out, backend, keep, event, new_local, add["names"])
            except BaseException:
                backend.remove(ids)
                raise
        else:
            backend.add(ids, vectors)
            _rewrite(idx, work, out, backend, keep, event, new_local, add["names"])
        rep.added, rep.count = len(ids), len(out["names"])
        return rep

    rep = locked_update(folder, run)
    rep.seconds = round(time.time() - t0, 3)
    return rep


def _writable_backend(idx: "Index"):
    """The index's search structure as an updatable backend: faiss (an index written before ids gets ids = rows) or
    the Milvus collection itself."""
    if isinstance(idx.index, FaissBackend) or idx.manifest.get("store"):
        return idx.index
    m = idx.manifest
    spec = auto_spec(m["metric"], m["code_bits"] if m["metric"] == "hamming" else m["dim"], len(idx), ann=m.get("ann", "flat"))
    b = FaissBackend(spec)
    vecs = np.asarray(idx.codes if m["metric"] == "hamming" else idx.descriptors)
    b.train(vecs)
    b.add(idx.ids, vecs)
    return b


def remove_images(folder: PathLike, names: Sequence[Union[str, Entry]], log: Callable[[str], None] = None) -> UpdateReport:
    """Remove gallery images by name (as listed at build; an :class:`Entry` also by its file). Atomic; their ids are never reused."""
    t0 = time.time()
    say = log or (lambda msg: _log(msg))

    def run(work: Path) -> UpdateReport:
        idx = Index(folder)
        # a name as listed at build, or the file of an indexed image (an absolute path, an Entry of a list spelled another way)
        files = {str(n.name): n.path for n in names if isinstance(n, Entry)}
        want = list(dict.fromkeys(str(n.name if isinstance(n, Entry) else n) for n in names))

        def find(n: str):
            r = idx.row(n)
            if r is None and (n in files or os.path.isabs(n)):
                r = idx.row_of_path(files.get(n, n))
            return r

        rows_rm = [find(n) for n in want]
        missing = [n for n, r in zip(want, rows_rm) if r is None]
        if missing and len(missing) < len(want):  # none found: the error below says so
            say(f"note: {len(missing)} name(s) not in the index, e.g. {missing[0]}")
        drop = np.array(sorted(r for r in rows_rm if r is not None), dtype=np.int64)
        rep = UpdateReport(index=idx.folder, count=len(idx), skipped=missing)
        if not len(drop):
            if want:
                raise CbirError(f"{idx.folder}: none of the {len(want)} name(s) is in the index (names are as listed at build, e.g. {idx.names[0]})")
            return rep
        rows, _ = read_rows(idx.folder / FEATURES)
        if "ids" not in rows:
            rows["ids"] = idx.ids.copy()
        keep = np.setdiff1d(np.arange(len(idx)), drop)
        out = {k: v[keep] for k, v in rows.items() if isinstance(v, np.ndarray) and len(v) == len(idx)}
        backend = _writable_backend(idx)
        backend.remove(idx.ids[drop])
        try:
            _rewrite(idx, work, out, backend, [str(n) for n in out["names"]], {"removed": int(len(drop))})
        except BaseException:
            if idx.manifest.get("store"):  # Milvus: put the removed vectors back, the folder still lists them
                vecs = idx.query_vectors(drop)
                backend.add(idx.ids[drop], vecs, names=[str(n) for n in idx.names[drop]],
                            labels=["" if l is None else str(l) for l in idx.labels[drop]])
            raise
        rep.removed, rep.count = int(len(drop)), int(len(keep))
        return rep

    rep = locked_update(folder, run)
    rep.seconds = round(time.time() - t0, 3)
    return rep


def compact_index(folder: PathLike) -> UpdateReport:
    """Rebuild the search structure from the stored vectors: drops HNSW tombstones, retrains PCA/PQ/IVF on the gallery."""
    t0 = time.time()

    def run(work: Path) -> UpdateReport:
        idx = Index(folder)
        if idx.manifest.get("store"):
            raise CbirError(f"{idx.folder}: its vectors are in a Milvus collection, which keeps its own index up to date "
                            "(removals included): there is nothing to compact")
        rows, _ = read_rows(idx.folder / FEATURES)
        rows.setdefault("ids", idx.ids.copy())
        m = idx.manifest
        old = idx.index.spec if isinstance(idx.index, FaissBackend) else None
        spec = SearchSpec.from_json({**(old.to_json() if old else {"metric": m["metric"], "dim_in": m["code_bits"] if m["metric"] == "hamming" else m["dim"]}),
                                     "removed": []})
        vecs = rows["codes"] if m["metric"] == "hamming" else rows["descriptors"]
        backend = FaissBackend(spec)
        backend.train(vecs[fit_rows(len(vecs), spec)])
        backend.add(rows["ids"], vecs)
        _rewrite(idx, work, rows, backend, [str(n) for n in rows["names"]], {"compacted": len(old.removed) if old else 0})
        return UpdateReport(index=idx.folder, count=len(rows["names"]), removed=len(old.removed) if old else 0)

    rep = locked_update(folder, run)
    rep.seconds = round(time.time() - t0, 3)
    return rep
