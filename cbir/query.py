"""The query stage: an index folder with the extractor that describes query images (:class:`Index`).

    idx = load_index("indexes/corel1k")
    hits = idx.query_images(["query.jpg"], top_k=10)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CbirError, IndexMismatch, query_failed
from .extractors.base import Extractor, make_extractor
from .index import store
from .index.gallery import Gallery

PathLike = Union[str, os.PathLike]
#: a gallery row and its score
Pair = Tuple[int, float]


class UnknownLabel(CbirError):
    """No image of the index has the label asked for; ``known`` lists the labels it has (keys and display names)."""

    def __init__(self, label: str, known: List[str]) -> None:
        some = ", ".join(known[:10]) if known else "(none: the index has no labels)"
        super().__init__(f"no image has label {label!r}; labels: {some}" + (" ..." if len(known) > 10 else ""))
        self.label, self.known = label, known


@dataclass
class Ranking:
    """An answer of :meth:`Index.rank`: ``(row, score)`` pairs best first and, when re-ranked, each verified
    candidate's inlier count and verdict (rows without local features are absent)."""

    pairs: List[Pair]
    inliers: Optional[Dict[int, int]] = None
    verified: Optional[Dict[int, bool]] = None


class Index(Gallery):
    """A built index folder (see :class:`~cbir.index.gallery.Gallery`) with its extractor, exactly as at build."""

    def __init__(self, folder: PathLike, verify: bool = True, mmap: bool = False) -> None:
        super().__init__(folder, verify=verify, mmap=mmap)
        self._extractor: Optional[Extractor] = None

    def open_local(self):
        """``local.h5`` (re-ranking features), checked against the manifest like every index file."""
        from .local.store import LocalFeatureStore

        if not (self.folder / store.LOCAL_FILE).exists() and not self.manifest.get("local"):
            raise CbirError(f"{self.folder}: no local features (build the index with --local FEATURES to re-rank)")
        return store.open_checked(self.folder, store.LOCAL_FILE, self.manifest, lambda p: LocalFeatureStore(p, mode="r"), self._verify)

    def adopt_extractor(self, other: "Index") -> bool:
        """Use ``other``'s extractor (already built) when both manifests record the same one exactly (configuration,
        learned state, weights and dimension): a new version of an index after ``index add`` then loads no model.
        True when adopted; nothing changes when this index built its own already or the two differ."""
        if self._extractor is not None:
            return False
        old, new = other.manifest.get("extractor") or {}, self.manifest.get("extractor") or {}
        if not (old.get("key") and old.get("key") == new.get("key") and old.get("weights") == new.get("weights")
                and other.manifest.get("dim") == self.manifest.get("dim")):
            return False
        self._extractor = other.extractor
        return True

    @property
    def extractor(self) -> Extractor:
        """The extractor exactly as the gallery was described (config + learned state)."""
        if self._extractor is None:
            m = self.manifest
            ident = m["extractor"]
            conf = {}
            for k, v in ident["conf"].items():
                if v == f"@{k}":  # a file the index keeps a copy of (validated as a plain name by the manifest schema)
                    store.verify_file(self.folder, f"{k}.h5", m, self._verify)
                    v = str(self.folder / f"{k}.h5")
                conf[k] = v
            try:
                ext = make_extractor(ident["name"], conf)
            except CbirError as e:
                raise CbirError(f"{self.folder / store.MANIFEST}: its extractor cannot be made here ({e})") from None
            if ident.get("state") is not None or (self.folder / store.STATE_FILE).exists():
                arrays = self.open_file(store.STATE_FILE, store.load_state_file)  # the version opened, even if replaced since
                try:
                    ext.load_state(arrays)
                except (CbirError, KeyError, ValueError) as e:
                    raise store.damaged(self.folder, store.STATE_FILE, f"learned state does not load: {e}", m) from None
            try:
                dim = int(ext.dim)
            except CbirError as e:
                raise CbirError(f"{self.folder / store.MANIFEST}: its extractor cannot be made here ({e})") from None
            if dim != m["dim"]:  # checked before any descriptor is allocated from a (possibly hostile) conf
                raise store.damaged(self.folder, store.MANIFEST, f"the extractor conf implies {dim}-d descriptors, the index holds {m['dim']}-d", m)
            if ext.weights() != ident.get("weights", {}):
                raise IndexMismatch(
                    f"{self.folder}: the index was built with weights {ident.get('weights')} but this machine resolves {ext.weights()}; "
                    "queries would not be comparable"
                )
            self._extractor = ext
        return self._extractor

    def describe_images(self, images: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(final float descriptors, index-side vectors) of query images."""
        ext = self.extractor
        final = ext.describe(images)
        return final, (ext.encode(final) if self.metric == "hamming" else final)

    def query_images(self, paths: Sequence[PathLike], top_k: int = 10, exclude_self: bool = False,
                     failures: Optional[List[Dict[str, Any]]] = None,
                     expand: Any = "index") -> List[Dict[str, Any]]:
        """Rank the gallery for each image file; returns one dict per answered query with its ranked results.

        A query that cannot be answered (unreadable file, an image without a usable descriptor) raises its
        :class:`CbirError`, unless ``failures`` is a list: then ``{"path", "cause", "position"}`` (position: its index
        in ``paths``) is appended there and the other queries are still answered. Errors of the index itself
        (:class:`IndexMismatch`: extractor, weights, dimension) always raise.

        ``expand``: the graph stage (cbir/index/expansion.py): ``"index"`` (what the index records, the default),
        None (plain top-k) or ``{"qe_k", "alpha", "dba_k", "diffusion"}``.
        """
        from .data import decode_image

        if int(top_k) < 1:
            raise CbirError(f"top_k must be a positive number of results, got {top_k}")
        ext = self.extractor
        search = self.searcher(expand)
        out = []
        for pos, p in enumerate(paths):
            t0 = time.time()
            try:
                img = decode_image(p, max_side=ext.max_side)
                _, vec = self.describe_images([img])
                ex = None
                if exclude_self:
                    r = self.row_of_path(p)
                    ex = np.array([-1 if r is None else r])
                scores, ids = search(vec, top_k, exclude=ex)
            except CbirError as err:
                query_failed(failures, p, pos, err)
                continue
            r = self.row_of_path(p)
            out.append({
                "query": str(p),
                "query_label": None if r is None else self.labels[r],
                "seconds": round(time.time() - t0, 4),
                "results": [self.result(int(i), float(s), r + 1) for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0],
            })
        return out


    # -- ranking one query vector (what the service and the page ask for)
    def label_filter(self, label: Optional[str]) -> Optional[Callable[[int], bool]]:
        """A test on gallery rows: whether the row's label is ``label`` (a label or its display name in
        ``label_names``); None for no label (no filter). :class:`UnknownLabel` when no image has it."""
        if label is None or label == "":
            return None
        names = self.manifest.get("label_names") or {}
        keys = {label} | {k for k, v in names.items() if v == label}
        known = set(self.manifest.get("labels") or []) | set(names)
        if not keys & known:
            raise UnknownLabel(label, sorted(known))
        labels = self.labels
        return lambda r: labels[r] in keys

    def ranked(self, vec: np.ndarray, top_k: int, keep: Optional[Callable[[int], bool]] = None, exclude: Optional[int] = None,
               search: Optional[Callable] = None, expand: Any = "index") -> List[Pair]:
        """The ``top_k`` best ``(row, score)`` pairs for one query vector (``vec``: shape (1, dim)) among the rows
        passing ``keep`` (None: all), without row ``exclude``; ``search`` (default :meth:`searcher` of ``expand``) is
        asked for more rows until enough pass or the gallery is exhausted."""
        n = len(self)
        if search is None:
            search = self.searcher(expand)
        ex = None if exclude is None else np.array([exclude])
        want = min(n, top_k + (0 if exclude is None else 1))
        k = want if keep is None else min(n, max(4 * top_k, 64))
        while True:
            scores, rows = search(vec, max(1, k), exclude=ex)
            pairs = [(int(r), float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0 and r != exclude and (keep is None or keep(int(r)))]
            if len(pairs) >= top_k or k >= n:
                return pairs[:top_k]
            k = min(n, k * 4)

    def reranked(self, vec: np.ndarray, candidates: List[Pair], reranker, query: Any, top_k: int, top: int = 100,
                 keep: Optional[Callable[[int], bool]] = None, exclude: Optional[int] = None, search: Optional[Callable] = None,
                 expand: Any = "index") -> Ranking:
        """Re-rank ``candidates`` (what :meth:`ranked` gave for ``vec``) with ``reranker``
        (:class:`cbir.local.rerank.Reranker`) for ``query`` (an image or what its ``query_item`` gave), its verified
        query expansion searching with the same filter; the ``top_k`` first, with inliers and verdicts."""
        if search is None:
            search = self.searcher(expand)
        score = dict(candidates)

        def search_rows(q, k, exclude=None):  # the graph stage with the label filter, as arrays (for verified expansion)
            got = self.ranked(q, k, keep, None if exclude is None else int(exclude[0]), search)
            return np.array([[s for _, s in got]], np.float32), np.array([[r for r, _ in got]], np.int64)

        ids = np.array([r for r, _ in candidates], np.int64)
        rr = reranker.rerank_query(query, ids, top=top, qvec=vec[0], search=search_rows, k=len(ids), exclude=exclude, scores=score)
        pairs = [(int(r), score[int(r)]) for r in rr.ids if int(r) >= 0][:top_k]
        return Ranking(pairs, rr.inliers, rr.verified)

    def rank(self, vec: np.ndarray, top_k: int, label: Optional[str] = None, exclude: Optional[int] = None, expand: Any = "index",
             reranker=None, query: Any = None, top: int = 100, search: Optional[Callable] = None) -> Ranking:
        """Rank the gallery for one query vector: the ``top_k`` best rows with ``label`` (None: any), without row
        ``exclude``, through the graph stage ``expand`` (or ``search``); with ``reranker`` and ``query``, the ``top``
        first candidates re-ranked by it (:meth:`reranked`)."""
        keep = self.label_filter(label)
        if search is None:
            search = self.searcher(expand)
        if reranker is None:
            return Ranking(self.ranked(vec, top_k, keep, exclude, search))
        cands = self.ranked(vec, max(top_k, top), keep, exclude, search)
        return self.reranked(vec, cands, reranker, query, top_k, top, keep, exclude, search)


def load_index(folder: PathLike) -> Index:
    return Index(folder)


def verify_index(folder: PathLike) -> Dict[str, Any]:
    """Check every file of an index against its manifest (size and SHA-256), then open it as a query would
    (shapes, faiss dimensions, the extractor with its learned state and weights, local features).

    Returns ``{"index", "ok", "files": [{"file", "bytes", "ok", "error"?}], "errors": [...]}``; a manifest that is
    missing or invalid raises, as there is nothing to check against.
    """
    folder = Path(folder)
    m = store.read_manifest(folder)
    files, errors = [], []
    recorded = m.get("files") or {}
    if not recorded:
        errors.append(f"{folder / store.MANIFEST}: records no checksums (built by an older cbir); rebuild the index to verify it")
    for name, rec in recorded.items():
        try:
            store.verify_file(folder, name, m, full=True)
            files.append({"file": name, "bytes": rec["bytes"], "ok": True})
        except CbirError as e:
            files.append({"file": name, "bytes": rec["bytes"], "ok": False, "error": str(e)})
            errors.append(str(e))
    extra = sorted(p.name for p in folder.iterdir() if p.name not in recorded and p.name != store.MANIFEST)
    if not errors:
        try:
            idx = Index(folder)
            idx.extractor  # noqa: B018 - builds the extractor: state, dimension and weights checked
            if m.get("local"):
                idx.open_local().close()
        except CbirError as e:
            errors.append(str(e))
    return {"index": str(folder), "ok": not errors, "count": m["count"], "files": files, "unrecorded": extra, "errors": errors}
