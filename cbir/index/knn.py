"""The gallery's k-NN graph, kept in the index folder (``knn.h5``) and up to date under add / remove / compact.

The graph stage (cbir/index/expansion.py: DBA, diffusion) needs each gallery image's nearest other images. An index
built with a graph stage stores them once, by stable image id: ``ids`` ``(n, K)`` (int64, -1 where the gallery has
fewer than K other images) and ``sims`` ``(n, K)`` (float32, best first), row i for the image of row i of
features.h5. They come from the index's own search (the faiss structure the queries use), so the graph is what a query
of each gallery image would see, itself left out.

Updates recompute only the neighbourhoods that change (:func:`update`):

* an added image gets its list by one search of the updated index;
* a kept image whose list names a removed image is searched again;
* every other kept image keeps its list, merged with the added images that beat its K-th neighbour: one
  (kept x added) similarity block at a time, never an (N, N) matrix.

Exact for a flat index; with an approximate one (IVF, HNSW) as exact as its search.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from ..errors import CbirError

GRAPH_FILE = "knn.h5"
#: rows per search / similarity block
BATCH = 1024
SearchIds = Callable[..., Tuple[np.ndarray, np.ndarray]]


def graph_k(spec: Optional[Dict]) -> int:
    """Neighbours per image the graph stage ``spec`` needs (0: none): DBA's or diffusion's k, + 1 (the replacement
    when a leave-one-out query is one of them)."""
    if not spec:
        return 0
    need = int(spec.get("dba_k") or 0) + 1 if spec.get("dba_k") else 0
    diff = spec.get("diffusion") or {}
    return max(need, int(diff.get("k") or 0) + 1 if diff else 0)


def compute(vectors, ids: np.ndarray, search: SearchIds, k: int, progress=None) -> Tuple[np.ndarray, np.ndarray]:
    """(nbr_ids, sims) of every row: ``search(x, k, exclude=image_ids)`` returns (scores, image ids) like a backend.

    ``vectors`` is anything that reads row blocks by slice (an array, an h5 dataset)."""
    n = len(ids)
    nbr = np.full((n, k), -1, np.int64)
    sims = np.zeros((n, k), np.float32)
    for a in range(0, n, BATCH):
        b = min(n, a + BATCH)
        s, i = search(np.ascontiguousarray(vectors[a:b], np.float32), k, exclude=ids[a:b])
        nbr[a:b, : i.shape[1]], sims[a:b, : s.shape[1]] = i, s
        if progress is not None:
            progress(b - a)
    sims[nbr < 0] = 0.0
    return nbr, sims


def write(path: os.PathLike, nbr: np.ndarray, sims: np.ndarray) -> None:
    from .rows import write_arrays

    write_arrays(path, {"ids": np.asarray(nbr, np.int64), "sims": np.asarray(sims, np.float32)}, attrs={"k": int(nbr.shape[1])})


def read(path: os.PathLike, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """(nbr_ids, sims) of a knn.h5 that must hold ``n`` rows (checked: a damaged file is named, never used)."""
    from .rows import read_rows

    arrays, _ = read_rows(path)
    nbr, sims = arrays.get("ids"), arrays.get("sims")
    if nbr is None or sims is None or nbr.ndim != 2 or nbr.shape != sims.shape or len(nbr) != n:
        raise CbirError(f"{path}: damaged k-NN graph (shapes {getattr(nbr, 'shape', None)} / {getattr(sims, 'shape', None)}, "
                        f"{n} rows expected)")
    return np.asarray(nbr, np.int64), np.asarray(sims, np.float32)


def as_rows(nbr: np.ndarray, sims: np.ndarray, row_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(sims, rows): the graph with image ids turned into gallery rows (``row_ids`` increasing), -1 / 0 where unknown."""
    pos = np.searchsorted(row_ids, np.maximum(nbr, 0))
    pos = np.minimum(pos, max(len(row_ids) - 1, 0))
    ok = (nbr >= 0) & (len(row_ids) > 0)
    if len(row_ids):
        ok &= row_ids[pos] == nbr
    return np.where(ok, sims, 0.0).astype(np.float32), np.where(ok, pos, -1).astype(np.int64)


def _merge(nbr: np.ndarray, sims: np.ndarray, cand: np.ndarray, cs: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` best of two neighbour lists (missing entries: id -1)."""
    ids = np.concatenate([nbr, cand], 1)
    s = np.concatenate([np.where(nbr >= 0, sims, -np.inf), np.where(cand >= 0, cs, -np.inf)], 1)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    out_i = np.take_along_axis(ids, order, 1)
    out_s = np.take_along_axis(s, order, 1)
    out_i[~np.isfinite(out_s)] = -1
    return out_i, np.where(np.isfinite(out_s), out_s, 0.0).astype(np.float32)


def update(old_nbr: np.ndarray, old_sims: np.ndarray, old_ids: np.ndarray, new_ids: np.ndarray, vectors: np.ndarray,
           search: SearchIds, k: int) -> Tuple[Tuple[np.ndarray, np.ndarray], Dict[str, int]]:
    """The graph of the updated gallery (rows ``new_ids``, their ``vectors``) from the old one (module docstring).

    Returns ``((nbr, sims), counts)`` with counts of rows ``searched`` (added or stale) and ``merged`` (kept rows that
    took an added image in)."""
    new_ids = np.asarray(new_ids, np.int64)
    n = len(new_ids)
    old_ids = np.asarray(old_ids, np.int64)
    old_row = {int(i): r for r, i in enumerate(old_ids)}
    kept_old = np.array([old_row.get(int(i), -1) for i in new_ids], np.int64)
    kept = kept_old >= 0
    removed = np.setdiff1d(old_ids, new_ids)
    nbr = np.full((n, k), -1, np.int64)
    sims = np.zeros((n, k), np.float32)
    kk = min(k, old_nbr.shape[1]) if old_nbr.ndim == 2 else 0
    if kept.any() and kk:
        nbr[kept, :kk] = old_nbr[kept_old[kept], :kk]
        sims[kept, :kk] = old_sims[kept_old[kept], :kk]
    stale = kept & np.isin(nbr, removed).any(1) if len(removed) else np.zeros(n, bool)
    if kk < k:  # the stage now needs more neighbours than were kept: every row is searched again
        stale = kept.copy()
    added = np.flatnonzero(~kept)
    merge_rows = np.flatnonzero(kept & ~stale)
    x = vectors
    if len(added) and len(merge_rows):
        xa = np.ascontiguousarray(x[added], np.float32)
        ka = min(k, len(added))
        for a in range(0, len(merge_rows), BATCH):
            sel = merge_rows[a : a + BATCH]
            s = np.ascontiguousarray(x[sel], np.float32) @ xa.T
            top = np.argpartition(-s, ka - 1, axis=1)[:, :ka] if ka < len(added) else np.broadcast_to(np.arange(len(added)), s.shape)
            cs = np.take_along_axis(s, top, 1)
            nbr[sel], sims[sel] = _merge(nbr[sel], sims[sel], new_ids[added][top], cs, k)
    todo = np.flatnonzero(~kept | stale)
    for a in range(0, len(todo), BATCH):
        sel = todo[a : a + BATCH]
        s, i = search(np.ascontiguousarray(x[sel], np.float32), k, exclude=new_ids[sel])
        nbr[sel] = -1
        sims[sel] = 0.0
        nbr[sel, : i.shape[1]], sims[sel, : s.shape[1]] = i, s
    sims[nbr < 0] = 0.0
    merged = int(len(merge_rows)) if len(added) else 0
    return (nbr, sims), {"searched": int(len(todo)), "merged": merged}


def compute_from_file(features: os.PathLike, ids: np.ndarray, search: SearchIds, k: int, progress=None) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`compute` over the descriptors of a features.h5, read one block at a time."""
    import h5py

    with h5py.File(features, "r") as f:
        return compute(f["descriptors"], ids, search, k, progress)
