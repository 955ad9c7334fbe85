"""Geometric re-ranking: inlier counts of one query against many candidates, and the index-level re-ranker.

:func:`rerank_scores` is the building block: sparse matchers take features dicts (e.g. read from ``local.h5``), a
detector-free matcher (``loftr``) takes RGB images. The matcher's :meth:`match_many` does the batching;
candidates are processed in chunks of ``chunk`` so memory stays bounded however long the shortlist is.

:class:`Reranker` re-orders an index's ranked list: the ``top`` first candidates are verified against the query,
those with at least ``min_inliers`` inliers move to the front by decreasing inlier count (ties keep the global
order), the others keep their global order after them, and the tail beyond ``top`` is untouched.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import CbirError, query_failed
from .base import Matcher, correspondences
from .verify import verify


def rerank_scores(
    query: Any,
    candidates: Sequence[Any],
    matcher: Matcher,
    model: str = "homography",
    verify_conf: Optional[Dict[str, Any]] = None,
    chunk: int = 32,
    details: bool = False,
) -> List[Any]:
    """Inlier count of ``model`` between ``query`` and each candidate (same order); 0 where nothing verifies.

    With ``details=True`` each entry is a dict ``{n_matches, n_inliers, matrix}`` instead of an int.
    """
    out: List[Any] = []
    vc = verify_conf or {}
    for start in range(0, len(candidates), max(1, int(chunk))):
        block = list(candidates[start : start + chunk])
        results = matcher.match_many(query, block)
        for cand, res in zip(block, results):
            corr = res if matcher.detector_free else correspondences(query, cand, res)
            v = verify(corr["keypoints0"], corr["keypoints1"], model, **vc)
            if details:
                out.append({"n_matches": int(len(corr["keypoints0"])), "n_inliers": v.score, "matrix": None if v.matrix is None else v.matrix.tolist()})
            else:
                out.append(v.score)
    return out


def reorder(ids: np.ndarray, inliers: Sequence[int], min_inliers: int) -> np.ndarray:
    """``ids`` with its first ``len(inliers)`` entries re-ordered as the module docstring says."""
    ids = np.asarray(ids)
    n = len(inliers)
    inl = np.asarray(inliers, np.int64)
    pos = np.arange(n)
    good = inl >= min_inliers
    head = pos[good][np.lexsort((pos[good], -inl[good]))]
    order = np.concatenate([head, pos[~good]]).astype(np.int64)
    return np.concatenate([ids[:n][order], ids[n:]])


#: matchers whose cost grows with the square of the keypoint count
ATTENTION_MATCHERS = frozenset({"lightglue", "lighterglue", "superglue"})
#: default keypoints per image for them: top-100 of lighterglue in ~2.3 s per query on 2 cores (512: ~5.2 s), see
#: benchmarks/results/rerank.json
ATTENTION_KEYPOINTS = 256
#: default keypoints per image for the nearest-neighbour matchers (mnn, kdtree)
OTHER_KEYPOINTS = 1024


class QueryViews(list):
    """The query seen at several rotations; :meth:`Reranker.rerank_item` keeps each candidate's best view."""


class Reranker:
    """Re-ranks the results of an index built with ``--local FEATURES`` using matcher ``matcher``.

    ``conf``: ``model`` (homography), ``verify`` (options of :func:`~cbir.local.verify.verify`), ``min_inliers``
    (15), ``matcher_conf`` (options of the matcher), ``weights`` (matcher weight file), ``device`` (cpu),
    ``cache_mb`` (256: candidate features kept in memory between queries), ``max_keypoints`` (the strongest
    keypoints of each image that are matched; None: :data:`ATTENTION_KEYPOINTS` for the attention matchers, whose cost
    grows with its square, :data:`OTHER_KEYPOINTS` for the rest), ``rotations`` ([0]: angles in degrees, multiples of
    90, by which the query is also turned; a candidate scores its best view. The learned features and matchers are
    not rotation invariant, SIFT is; each angle costs one more query extraction and one more match per candidate).
    """

    DEFAULTS: Dict[str, Any] = {"model": "homography", "verify": {}, "min_inliers": 15, "matcher_conf": {}, "weights": None,
                                "device": "cpu", "cache_mb": 256, "max_keypoints": None, "rotations": [0]}

    def __init__(self, index, matcher: str, conf: Optional[Dict[str, Any]] = None) -> None:
        from . import build_matcher
        from .base import merge_conf
        from .store import LocalFeatureStore

        self.index = index
        self.conf = merge_conf(self.DEFAULTS, conf or {}, "re-ranking")
        if self.conf["max_keypoints"] is None:
            self.conf["max_keypoints"] = ATTENTION_KEYPOINTS if matcher in ATTENTION_MATCHERS else OTHER_KEYPOINTS
        rots = [int(r) for r in (self.conf["rotations"] or [0])]
        if any(r % 90 for r in rots):
            raise CbirError(f"re-ranking rotations must be multiples of 90 degrees, got {rots}")
        self.conf["rotations"] = list(dict.fromkeys(r % 360 for r in rots))
        local = (index.manifest.get("local") or {}) if hasattr(index, "manifest") else {}
        if not local.get("name"):
            raise CbirError(f"{index.folder}: the index holds no local features; rebuild it with --local FEATURES to re-rank")
        self.features = str(local["name"])
        self.identity = local.get("identity") or {}
        self.matcher: Matcher = build_matcher(matcher, features=None if _detector_free(matcher) else self.features,
                                              weights=self.conf["weights"], device=self.conf["device"], **self.conf["matcher_conf"])
        self.store = None if self.matcher.detector_free else (
            index.open_local() if hasattr(index, "open_local") else LocalFeatureStore(index.folder / "local.h5", mode="r"))
        self._extractor = None
        self._cache: "OrderedDict[int, Any]" = OrderedDict()
        self._cache_bytes = 0
        self.last_inliers: Dict[int, int] = {}

    # -- features
    @property
    def extractor(self):
        """The local extractor exactly as the index recorded it (built on first use, for queries outside the index)."""
        if self._extractor is None:
            from .store import make_local_extractor

            conf = dict(self.identity.get("conf") or {})
            conf["max_side"] = self.identity.get("max_side")
            self._extractor = make_local_extractor(self.features, conf)
        return self._extractor

    def _max_side(self) -> Optional[int]:
        """Decode queries as the gallery was: the build decodes at least at the local extractor's ``max_side`` and the
        local extractor shrinks to it, so that size decides the frame of the keypoints (None: full size)."""
        side = self.identity.get("max_side")
        return int(side) if side else None

    def _image(self, path) -> np.ndarray:
        from ..data import decode_image

        return decode_image(path, max_side=self._max_side())

    def _candidate(self, i: int):
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        if self.matcher.detector_free:
            item = self._image(self.index.paths[i])
        else:
            name = str(self.index.names[i])
            if name not in self.store:
                return None
            item = strongest(self.store.get(name), self.conf["max_keypoints"])
        size = sum(np.asarray(v).nbytes for v in item.values()) if isinstance(item, dict) else np.asarray(item).nbytes
        self._cache[i] = item
        self._cache_bytes += size
        limit = int(self.conf["cache_mb"]) << 20
        while self._cache_bytes > limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= sum(np.asarray(v).nbytes for v in old.values()) if isinstance(old, dict) else np.asarray(old).nbytes
        return item

    def query_item(self, entry) -> Any:
        """Features (or the image, for a detector-free matcher) of a query ``Entry``: stored ones when it is indexed;
        :class:`QueryViews` of them when ``rotations`` asks for turned copies."""
        stored = None
        if not self.matcher.detector_free and self.store is not None and entry.name in self.store:
            stored = strongest(self.store.get(entry.name), self.conf["max_keypoints"])
            if self.conf["rotations"] == [0]:
                return stored
        return self._query_views(self._image(entry.path), stored)

    def _query_views(self, img: np.ndarray, stored: Any = None) -> Any:
        """The query as matched: one item, or one per rotation (``stored``: its features at 0 degrees, if known)."""
        views = []
        for rot in self.conf["rotations"]:
            if rot == 0 and stored is not None:
                views.append(stored)
                continue
            turned = np.ascontiguousarray(np.rot90(img, k=rot // 90))  # counter-clockwise
            views.append(turned if self.matcher.detector_free else strongest(self.extractor.extract(turned), self.conf["max_keypoints"]))
        return views[0] if len(views) == 1 else QueryViews(views)

    # -- ranking
    def rerank_item(self, query: Any, ids: np.ndarray, top: int = 100) -> np.ndarray:
        """Re-ordered ``ids`` (same length) for a query given as features (or image); see the module docstring."""
        ids = np.asarray(ids)
        head = [int(i) for i in ids[: max(0, int(top))]]
        cands, where = [], []
        for k, i in enumerate(head):
            if i < 0:
                continue
            c = self._candidate(i)
            if c is not None:
                cands.append(c)
                where.append(k)
        views = query if isinstance(query, QueryViews) else [query]
        scores = np.max([rerank_scores(v, cands, self.matcher, self.conf["model"], self.conf["verify"]) for v in views], axis=0) \
            if cands else []
        inliers = np.full(len(head), -1, np.int64)
        inliers[where] = scores
        self.last_inliers = {i: int(s) for i, s in zip(head, inliers) if i >= 0}
        return reorder(ids, inliers, int(self.conf["min_inliers"]))

    def rerank(self, entry, ids: np.ndarray, scores: Optional[np.ndarray] = None, top: int = 100) -> np.ndarray:
        """The engine's call: re-order the ranked gallery rows ``ids`` of query ``entry`` (an ``Entry``)."""
        return self.rerank_item(self.query_item(entry), ids, top)

    def query_images(self, paths: Sequence, top_k: int = 10, top: int = 100,
                     failures: Optional[List[Dict[str, Any]]] = None) -> List[Dict[str, Any]]:
        """Like ``Index.query_images``, re-ranked; each verified result carries its ``inliers``.

        ``failures``: as in ``Index.query_images`` (a list: unreadable queries are appended there as
        ``{"path", "cause", "position"}`` and the others answered; None: the first one raises).
        """
        from ..data import decode_image
        from ..errors import IndexMismatch

        if int(top_k) < 1:
            raise CbirError(f"top_k must be a positive number of results, got {top_k}")
        idx = self.index
        ext = idx.extractor
        out = []
        for pos, p in enumerate(paths):
            t0 = time.time()
            try:
                _, vec = idx.describe_images([decode_image(p, max_side=ext.max_side)])
                k = min(len(idx), max(int(top_k), int(top)))
                s, ids = idx.search(vec, k)
                views = self._query_views(self._image(p))
            except CbirError as err:
                query_failed(failures, p, pos, err)
                continue
            score_of = {int(i): float(v) for i, v in zip(ids[0], s[0]) if i >= 0}
            new = self.rerank_item(views, ids[0], top=top)
            results = []
            for r, i in enumerate([int(i) for i in new if i >= 0][: int(top_k)]):
                row = idx.result(i, score_of[i], r + 1)
                if i in self.last_inliers and self.last_inliers[i] >= 0:
                    row["inliers"] = self.last_inliers[i]
                results.append(row)
            row_q = idx._row_of_path(p)
            out.append({"query": str(p), "query_label": None if row_q is None else idx.labels[row_q],
                        "seconds": round(time.time() - t0, 4), "results": results})
        return out

    def describe(self) -> Dict[str, Any]:
        """What the report records about the re-ranking."""
        return {
            "features": None if self.matcher.detector_free else self.features,
            "matcher_conf": dict(self.matcher.conf),
            "model": self.conf["model"],
            "verify": dict(self.conf["verify"]),
            "min_inliers": int(self.conf["min_inliers"]),
            "max_keypoints": self.conf["max_keypoints"],
            "rotations": list(self.conf["rotations"]),
        }

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def strongest(feats: Dict[str, np.ndarray], k: Optional[int]) -> Dict[str, np.ndarray]:
    """The ``k`` keypoints of highest score (all when ``k`` is falsy or there are fewer)."""
    if not k or len(feats["scores"]) <= int(k):
        return feats
    o = np.argsort(-np.asarray(feats["scores"]), kind="stable")[: int(k)]
    return {**feats, "keypoints": feats["keypoints"][o], "descriptors": feats["descriptors"][o], "scores": feats["scores"][o]}


def _detector_free(name: str) -> bool:
    from . import load_plugins
    from .base import MATCHERS

    load_plugins()
    return bool(MATCHERS.get(name).detector_free)

