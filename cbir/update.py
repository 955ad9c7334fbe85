"""Updates of a built index in place: add images, remove images, compact the search structure (each atomic)."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Union

import numpy as np

from .build import _decode_side, _extract_singly, _fit_rows, shrink
from .data import Entry, batches as _batches, dedupe, file_stat as _stat, iter_decoded
from .errors import CbirError, IndexMismatch
from .index import knn, store
from .index.backend import FaissBackend, SearchSpec, auto_spec
from .progress import bar as _progress, log as _log
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
             new_local: Dict[str, Any], event: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``idx``'s folder anew from ``rows`` and ``backend`` in ``work/commit`` and move it into place (atomic)."""
    folder, m = idx.folder, idx.manifest
    commit = store.fresh_folder(work / "commit")
    extra = {k: rows[k] for k in ("ids", "codes", "raw") if k in rows}
    store.check_space(commit, sum(v.nbytes for v in rows.values() if isinstance(v, np.ndarray) and v.dtype != object) * 2 + (1 << 20),
                      "the updated index")
    store.write_features(commit / store.FEATURES, store.Rows(list(rows["names"]), list(rows["paths"]),
                                                             [None if l == "" else l for l in rows["labels"]], list(rows["file_size"]),
                                                             list(rows["file_mtime"]), np.asarray(rows["descriptors"], np.float32)), extra)
    backend.save(commit / m["faiss"])
    for name in (m.get("files") or {}):
        if name.endswith(".h5") and name not in (store.FEATURES, store.LOCAL_FILE, knn.GRAPH_FILE):
            shutil.copy2(folder / name, commit / name)  # learned state and bundled files: unchanged
    graph_note = _update_graph(idx, commit, rows, backend)
    if m.get("local"):
        from .local.store import LocalFeatureStore

        with LocalFeatureStore(commit / store.LOCAL_FILE, mode="a") as lw:
            lw.copy_from(folder / store.LOCAL_FILE, keep_local)
            for name, feats in new_local.items():
                lw.put(name, feats)
    labels = sorted({l for l in rows["labels"] if l != ""})
    manifest = {**m, "count": int(len(rows["names"])), "labels": labels, "search": backend.spec.to_json(),
                "next_id": int(max(int(m.get("next_id", 0)), int(rows["ids"].max()) + 1 if len(rows["ids"]) else 0)),
                "updated": store.now_iso(), "history": [*(m.get("history") or []), {**event, **graph_note, "at": store.now_iso()}][-100:]}
    manifest["files"] = {p.name: store.file_record(p) for p in sorted(commit.iterdir()) if p.is_file()}
    store.write_json_atomic(manifest, commit / store.MANIFEST)
    store.commit_folder(commit, folder)
    return manifest


def _update_graph(idx: "Index", commit: Path, rows: Dict[str, np.ndarray], backend) -> Dict[str, Any]:
    """knn.h5 of the updated gallery (cbir/index/knn.py: only the neighbourhoods that change are searched again), for
    an index that stores one; returns what the history records of it."""
    rec = idx.manifest.get("knn")
    if not isinstance(rec, dict) or not rec.get("k"):
        return {}
    t0 = time.time()
    k = int(rec["k"])
    old_nbr, old_sims = store.open_checked(idx.folder, knn.GRAPH_FILE, idx.manifest, lambda p: knn.read(p, len(idx)), True)
    (nbr, sims), counts = knn.update(old_nbr, old_sims, idx.ids, np.asarray(rows["ids"], np.int64),
                                     np.asarray(rows["descriptors"], np.float32), backend.search, k)
    knn.write(commit / knn.GRAPH_FILE, nbr, sims)
    return {"graph": {**counts, "seconds": round(time.time() - t0, 3)}}


def _locked_update(folder: PathLike, fn):
    folder = Path(folder)
    if not (folder / store.MANIFEST).is_file():
        store.read_manifest(folder)  # the one-line "not a cbir index" error
    stray = store.foreign_entry(folder)
    if stray is not None:  # checked before any work: the swap would refuse to replace this folder at the end
        raise CbirError(f"{folder}: holds {stray!r}, which is not part of a cbir index; move it out of the index folder "
                        "and run the update again (nothing was changed)")
    work = store.partial_dir(folder)
    store.claim_work(work, folder)
    with store.BuildLock(work, folder):
        keep = False
        try:
            return fn(work)
        except store.Kept:
            keep = True  # the message names the work folder as where the new index is: it stays
            raise
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)


def add_images(folder: PathLike, entries: Sequence[Entry], strict: bool = False, batch_size: int = 16, workers: int = 2,
               progress: bool = True, log: Callable[[str], None] = None) -> UpdateReport:
    """Extract only the images of ``entries`` not yet in the index, with the index's own extractor and learned state,
    and append them under new stable ids. Atomic like a build; queries opened afterwards see them."""
    t0 = time.time()
    say = log or (lambda msg: _log(msg))

    def run(work: Path) -> UpdateReport:
        idx = Index(folder)
        ext = idx.extractor
        new, _ = dedupe(entries)
        seen_files = set()  # one file listed under several spellings (./x, x//y, absolute) or already indexed under another name
        present, fresh = [], []
        for e in new:
            resolved = str(Path(e.path).resolve())
            if idx.row(e.name) is not None or idx.row_of_path(resolved) is not None or resolved in seen_files:
                present.append(e.name)
            else:
                fresh.append(e)
            seen_files.add(resolved)
        new = fresh
        rep = UpdateReport(index=idx.folder, count=len(idx), skipped=present)
        if present:
            say(f"note: {len(present)} image(s) already in the index kept as they are, e.g. {present[0]}")
        if not new:
            return rep
        local_ext = None
        lm = idx.manifest.get("local")
        if lm:
            from .local.store import make_local_extractor

            ident = lm.get("identity") or {}
            local_ext = make_local_extractor(lm["name"], {**(ident.get("conf") or {}), "max_side": ident.get("max_side")})
            if local_ext.key() != lm.get("key"):
                raise IndexMismatch(f"{idx.folder}: its local features ({lm['name']}) cannot be reproduced here (another "
                                    "configuration or weights); rebuild the index to add images")
        raws, metas, new_local = [], [], {}
        side = _decode_side(ext.max_side, local_ext.max_side if local_ext is not None else ext.max_side)
        pb = _progress(total=len(new), desc=f"add: {ext.name}", enabled=progress)
        for kind, item in _batches(iter_decoded(new, side, workers=workers), batch_size):
            if kind == "error":
                _, e, err = item
                if strict:
                    raise CbirError(f"--strict: {err} (nothing added)")
                rep.failures.append({"path": str(e.path), "name": e.name, "cause": err.cause})
                _log(f"skipped {e.path}: {err.cause}", pb)
                pb.update()
                continue
            raw = _extract_singly(ext, item, rep.failures, strict, pb, None) if len(item) == 1 else None
            if raw is None:
                try:
                    raw = list(ext.extract([shrink(img, ext.max_side) for _, _, img in item]))
                except CbirError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one by one, to name the image
                    raw = _extract_singly(ext, item, rep.failures, strict, pb, exc)
            for (_, e, img), r in zip(item, raw):
                if r is None or not np.isfinite(np.linalg.norm(r)) or np.linalg.norm(r) < 1e-12:
                    if r is not None:
                        rep.failures.append({"path": str(e.path), "name": e.name, "cause": "descriptor is zero or not finite"})
                    continue
                raws.append(np.asarray(r, np.float32))
                metas.append((e, _stat(e.path)))
                if local_ext is not None:
                    try:
                        new_local[e.name] = local_ext.extract(img)
                    except Exception as err:  # noqa: BLE001 - the global row stays, re-ranking scores it 0
                        _log(f"warning: {e.path}: no local features ({err})", pb)
            pb.update(len(item))
        pb.close()
        if not raws:
            raise CbirError(f"none of the {len(new)} new image(s) could be read; nothing added")
        raw = np.stack(raws)
        final = ext.post(raw)
        vectors = ext.encode(final) if idx.metric == "hamming" else final
        rows, _ = store.read_rows(idx.folder / store.FEATURES)
        if "ids" not in rows:
            rows["ids"] = idx.ids.copy()
        next_id = int(max(int(idx.manifest.get("next_id", 0)), int(rows["ids"].max()) + 1 if len(rows["ids"]) else 0))
        ids = np.arange(next_id, next_id + len(metas), dtype=np.int64)
        add = {"names": [e.name for e, _ in metas], "paths": [str(e.path.resolve()) for e, _ in metas],
               "labels": ["" if e.label is None else str(e.label) for e, _ in metas], "file_size": [s for _, (s, _) in metas],
               "file_mtime": [t for _, (_, t) in metas], "descriptors": final.astype(np.float32), "ids": ids}
        if "codes" in rows:
            add["codes"] = vectors
        if "raw" in rows:
            add["raw"] = raw
        out = {k: np.concatenate([np.asarray(rows[k], dtype=object if rows[k].dtype == object else rows[k].dtype),
                                  np.asarray(v, dtype=object if rows[k].dtype == object else rows[k].dtype)]) for k, v in add.items()}
        backend = _writable_backend(idx)
        if idx.manifest.get("store"):  # Milvus: the collection changes first; undone if the folder cannot follow
            backend.add(ids, vectors, names=add["names"], labels=add["labels"])
            try:
                _rewrite(idx, work, out, backend, [str(n) for n in idx.names], new_local, {"added": len(ids), "failures": len(rep.failures)})
            except BaseException:
                backend.remove(ids)
                raise
        else:
            backend.add(ids, vectors)
            _rewrite(idx, work, out, backend, [str(n) for n in idx.names], new_local, {"added": len(ids), "failures": len(rep.failures)})
        rep.added, rep.count = len(ids), len(out["names"])
        return rep

    rep = _locked_update(folder, run)
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
        if missing:
            say(f"note: {len(missing)} name(s) not in the index, e.g. {missing[0]}")
        drop = np.array(sorted(r for r in rows_rm if r is not None), dtype=np.int64)
        rep = UpdateReport(index=idx.folder, count=len(idx), skipped=missing)
        if not len(drop):
            if want:
                raise CbirError(f"{idx.folder}: none of the {len(want)} name(s) is in the index (names are as listed at build, e.g. {idx.names[0]})")
            return rep
        rows, _ = store.read_rows(idx.folder / store.FEATURES)
        if "ids" not in rows:
            rows["ids"] = idx.ids.copy()
        keep = np.setdiff1d(np.arange(len(idx)), drop)
        out = {k: v[keep] for k, v in rows.items() if isinstance(v, np.ndarray) and len(v) == len(idx)}
        backend = _writable_backend(idx)
        backend.remove(idx.ids[drop])
        try:
            _rewrite(idx, work, out, backend, [str(n) for n in out["names"]], {}, {"removed": int(len(drop))})
        except BaseException:
            if idx.manifest.get("store"):  # Milvus: put the removed vectors back, the folder still lists them
                vecs = idx.query_vectors(drop)
                backend.add(idx.ids[drop], vecs, names=[str(n) for n in idx.names[drop]],
                            labels=["" if l is None else str(l) for l in idx.labels[drop]])
            raise
        rep.removed, rep.count = int(len(drop)), int(len(keep))
        return rep

    rep = _locked_update(folder, run)
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
        rows, _ = store.read_rows(idx.folder / store.FEATURES)
        rows.setdefault("ids", idx.ids.copy())
        m = idx.manifest
        old = idx.index.spec if isinstance(idx.index, FaissBackend) else None
        spec = SearchSpec.from_json({**(old.to_json() if old else {"metric": m["metric"], "dim_in": m["code_bits"] if m["metric"] == "hamming" else m["dim"]}),
                                     "removed": []})
        vecs = rows["codes"] if m["metric"] == "hamming" else rows["descriptors"]
        backend = FaissBackend(spec)
        backend.train(vecs[_fit_rows(len(vecs), spec)])
        backend.add(rows["ids"], vecs)
        _rewrite(idx, work, rows, backend, [str(n) for n in rows["names"]], {}, {"compacted": len(old.removed) if old else 0})
        return UpdateReport(index=idx.folder, count=len(rows["names"]), removed=len(old.removed) if old else 0)

    rep = _locked_update(folder, run)
    rep.seconds = round(time.time() - t0, 3)
    return rep
