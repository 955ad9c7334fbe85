"""Geometric re-ranking: inlier counts of one query against many candidates, and the index-level re-ranker.

:func:`rerank_scores` is the building block: sparse matchers take features dicts (e.g. read from ``local.h5``), a
detector-free matcher (``loftr``) takes RGB images. The matcher's :meth:`match_many` does the batching;
candidates are processed in chunks of ``chunk`` so memory stays bounded however long the shortlist is.

:class:`Reranker` re-orders an index's ranked list: the ``top`` first candidates are verified against the query,
the verified ones (at least ``min_inliers`` inliers and, unless ``verdict`` is None, a model that passes
:func:`~cbir.local.verify.verdict`) move to the front by decreasing inlier count (ties keep the global order), the
others keep their global order after them, and the tail beyond ``top`` is untouched.

``Reranker(index, NAME)`` takes a matcher name (``mnn``, ``lighterglue``...: one matcher for every candidate) or a
named conf of :data:`cbir.local.confs.RERANK_CONFS`: ``default`` is the verification cascade of
:mod:`cbir.local.cascade` (batched mutual NN + MAGSAC for all, a second opinion for the open ones), ``seed000`` the
seed's kd-tree + affine RANSAC recipe. Gallery features are read from ``local.h5`` for the candidates only and kept in
an LRU cache shared by every re-ranker of the same index file in the process.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
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


@dataclass
class Reranked:
    """What :meth:`Reranker.rerank_query` answers: the re-ordered rows and, per verified candidate row, its inlier count
    (-1: no features), full result (``verified``, ``stage``, ``n_matches``, ``reason``, ``matrix``...) and verdict."""

    ids: np.ndarray
    inliers: Dict[int, int]
    results: Dict[int, Dict[str, Any]]
    verified: Dict[int, bool]


class Reranker:
    """Re-ranks the results of an index built with ``--local FEATURES`` using matcher ``matcher``.

    ``conf``: ``model`` (homography), ``verify`` (options of :func:`~cbir.local.verify.verify`), ``min_inliers``
    (15), ``matcher_conf`` (options of the matcher), ``weights`` (matcher weight file), ``device`` (cpu),
    ``cache_mb`` (256: candidate features kept in memory between queries), ``max_keypoints`` (the strongest
    keypoints of each image that are matched; None: :data:`ATTENTION_KEYPOINTS` for the attention matchers, whose cost
    grows with its square, :data:`OTHER_KEYPOINTS` for the rest), ``rotations`` ([0]: angles in degrees, multiples of
    90, by which the query is also turned; a candidate scores its best view. The learned features and matchers are
    not rotation invariant, SIFT is; each angle costs one more query extraction and one more match per candidate),
    ``verdict`` (None: a candidate is verified by its inlier count alone, as before; a dict: the rule of
    :func:`~cbir.local.verify.verdict` with ``min_inliers``), and for a cascade (``cascade`` True, see
    :mod:`cbir.local.cascade`) ``min_matches`` and ``second``. A named conf (``matcher="default"``) fills these in.
    """

    DEFAULTS: Dict[str, Any] = {"model": "homography", "verify": {}, "min_inliers": 15, "matcher_conf": {}, "weights": None,
                                "device": "cpu", "cache_mb": 256, "max_keypoints": None, "rotations": [0],
                                "verdict": None, "min_matches": 0, "cascade": False, "second": None, "sv_qe": None}

    def __init__(self, index, matcher: str, conf: Optional[Dict[str, Any]] = None) -> None:
        from . import build_matcher, matcher_names
        from .base import merge_conf
        from .confs import rerank_conf, rerank_names

        self.index = index
        self.name = str(matcher)
        named = rerank_conf(self.name)
        if named is not None:
            matcher = named.pop("matcher")
        elif self.name not in matcher_names():
            raise CbirError(f"unknown re-ranker {self.name!r}; choose a named one ({', '.join(rerank_names())}) or a matcher "
                            f"({', '.join(matcher_names())})")
        self.conf = merge_conf(self.DEFAULTS, {**(named or {}), **(conf or {})}, "re-ranking")
        if self.conf["max_keypoints"] is None and not self.conf["cascade"]:
            self.conf["max_keypoints"] = ATTENTION_KEYPOINTS if matcher in ATTENTION_MATCHERS else OTHER_KEYPOINTS
        rots = [int(r) for r in (self.conf["rotations"] or [0])]
        if any(r % 90 for r in rots):
            raise CbirError(f"re-ranking rotations must be multiples of 90 degrees, got {rots}")
        self.conf["rotations"] = list(dict.fromkeys(r % 360 for r in rots))
        local = (index.manifest.get("local") or {}) if hasattr(index, "manifest") else {}
        if not local.get("name"):
            raise CbirError(f"{index.folder}: the index holds no local features; rebuild it with --local FEATURES to re-rank")
        self.identity = local.get("identity") or {}
        # the registered extractor (an index built with --local default records its conf's name in "name")
        self.features = str(self.identity.get("name") or local["name"])
        self.projected = bool((self.identity.get("conf") or {}).get("project"))
        if self.projected and matcher not in ("mnn", "kdtree"):
            raise CbirError(f"{index.folder}: its local features are projected to {self.identity.get('descriptor_dim')}-d "
                            f"({local['name']}); {matcher!r} needs the extractor's own descriptors: use a nearest-neighbour "
                            "matcher (--rerank default, mnn, kdtree) or rebuild with --local FEATURES")
        self.matcher: Matcher = build_matcher(matcher, features=None if _detector_free(matcher) else self.features,
                                              weights=self.conf["weights"], device=self.conf["device"],
                                              **({} if self.conf["cascade"] else self.conf["matcher_conf"]))
        self.cascade = None
        if self.conf["cascade"]:
            from .cascade import Cascade

            if matcher != "mnn":
                raise CbirError(f"re-ranking cascade: the first stage is the batched mutual NN ('mnn'), got {matcher!r}")
            self.cascade = Cascade(self.conf, self.features, projected=self.projected, device=self.conf["device"])
        if self.matcher.detector_free:
            self.store, self._cache = None, _FeatureCache(int(self.conf["cache_mb"]))
        else:
            self.store, self._cache = shared_features(index, int(self.conf["cache_mb"]))
        self._extractor = None
        self._timing_lock = threading.Lock()
        self.last_inliers: Dict[int, int] = {}
        self.last_results: Dict[int, Dict[str, Any]] = {}
        self.keep_points = False
        self.timing: Dict[str, float] = {}

    # -- features
    @property
    def extractor(self):
        """The local extractor exactly as the index recorded it (built on first use, for queries outside the index)."""
        if self._extractor is None:
            from .store import local_extractor_from_identity

            self._extractor = local_extractor_from_identity({**self.identity, "name": self.features})
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
        if self.matcher.detector_free:
            key = ("image", int(i))
            item = self._cache.get(key)
            if item is None:
                item = self._cache.put(key, self._image(self.index.paths[i]))
            return item
        return self._stored(str(self.index.names[i]))

    def _stored(self, name: str):
        """Stored features of ``name`` (float32, unit descriptors, the ``max_keypoints`` strongest), or None."""
        key = (name, self.conf["max_keypoints"])
        item = self._cache.get(key)
        if item is None:
            if name not in self.store:
                return None
            item = self._cache.put(key, _prepared(self.store.get(name), self.conf["max_keypoints"]))
        return item

    def query_item(self, entry) -> Any:
        """Features (or the image, for a detector-free matcher) of a query ``Entry``: stored ones when it is indexed;
        :class:`QueryViews` of them when ``rotations`` asks for turned copies."""
        stored = None
        if not self.matcher.detector_free and self.store is not None and entry.name in self.store:
            stored = self._stored(entry.name)
            if self.conf["rotations"] == [0]:
                return stored
        return self.query_views(self._image(entry.path), stored)

    @property
    def query_side(self) -> Optional[int]:
        """The longer side a query image is decoded at to be matched against the gallery's local features (None: full size)."""
        return self._max_side()

    def query_views(self, img: np.ndarray, stored: Any = None) -> Any:
        """The query as matched: one item, or one per rotation (``stored``: its features at 0 degrees, if known)."""
        views = []
        for rot in self.conf["rotations"]:
            if rot == 0 and stored is not None:
                views.append(stored)
                continue
            turned = np.ascontiguousarray(np.rot90(img, k=rot // 90))  # counter-clockwise
            views.append(turned if self.matcher.detector_free else _prepared(self.extractor.extract(turned), self.conf["max_keypoints"]))
        return views[0] if len(views) == 1 else QueryViews(views)

    # -- ranking
    def rerank_item(self, query: Any, ids: np.ndarray, top: int = 100) -> np.ndarray:
        """Re-ordered ``ids`` (same length) for a query given as features (or image); see the module docstring.

        Afterwards ``last_inliers`` maps each candidate row to its inlier count (-1: no features) and ``last_results``
        to its full result (``verified``, ``stage``, ``n_matches``, ``reason``, ``matrix``; the inliers' ``points0`` /
        ``points1`` when ``keep_points`` is set). :meth:`rerank_query` keeps nothing between calls.
        """
        new, self.last_inliers, self.last_results = self._verify_head(query, ids, top, self.keep_points)
        return new

    def rerank_query(self, query: Any, ids: np.ndarray, top: int = 100, qvec: Optional[np.ndarray] = None, search=None,
                     k: Optional[int] = None, exclude: Optional[int] = None, scores: Optional[Dict[int, float]] = None,
                     keep_points: bool = False) -> Reranked:
        """Re-rank ``ids`` for one query and answer everything about it (:class:`Reranked`), keeping no per-query state:
        any number of threads may call it on one re-ranker at once.

        ``query``: an RGB image in the frame :attr:`query_side` gives (its views are made here), or what
        :meth:`query_item` / :meth:`query_views` gave. With ``qvec`` (its global vector) and ``search`` (the search the
        shortlist came from), verified query expansion follows as :meth:`expand_verified` (over ``k`` rows, default
        ``len(ids)``; ``scores`` takes the second search's scores of rows it lacks). A candidate without a verdict of its
        own is verified by the inlier floor ``min_inliers``.
        """
        views = self.query_views(query) if isinstance(query, np.ndarray) else query
        new, inliers, results = self._verify_head(views, ids, top, keep_points)
        if qvec is not None and search is not None:
            new = self.expand_verified(new, qvec, search, len(ids) if k is None else int(k), exclude=exclude, scores=scores,
                                       results=results)
        floor = int(self.conf["min_inliers"])
        verified = {i: bool(results[i]["verified"]) if i in results else n >= floor for i, n in inliers.items()}
        return Reranked(new, inliers, results, verified)

    def _verify_head(self, query: Any, ids: np.ndarray, top: int, keep_points: bool):
        """(re-ordered ids, row -> inliers, row -> result) of :meth:`rerank_item`, without touching ``self``'s state."""
        ids = np.asarray(ids)
        head = [int(i) for i in ids[: max(0, int(top))]]
        t = time.perf_counter()
        cands, where = [], []
        for k, i in enumerate(head):
            if i < 0:
                continue
            c = self._candidate(i)
            if c is not None:
                cands.append(c)
                where.append(k)
        self._time("read_s", time.perf_counter() - t)
        views = query if isinstance(query, QueryViews) else [query]
        best: List[Optional[Dict[str, Any]]] = [None] * len(cands)
        for v in views:
            res = self._results(v, cands, keep_points) if cands else []
            for j, r in enumerate(res):
                if best[j] is None or (r["verified"], r["n_inliers"]) > (best[j]["verified"], best[j]["n_inliers"]):
                    best[j] = r
        scores = np.full(len(head), -1, np.int64)
        inliers = np.full(len(head), -1, np.int64)
        results: Dict[int, Dict[str, Any]] = {}
        for k, r in zip(where, best):
            inliers[k] = r["n_inliers"]
            scores[k] = r["n_inliers"] if r["verified"] else -1
            results[head[k]] = r
        self._time("queries", 1)
        return reorder(ids, scores, 0), {i: int(s) for i, s in zip(head, inliers) if i >= 0}, results

    def _results(self, query: Any, cands: List[Any], keep_points: bool = False) -> List[Dict[str, Any]]:
        """One result per candidate: the cascade's, or the single matcher's with the verdict of ``conf['verdict']``."""
        if self.cascade is not None:
            before = dict(self.cascade.stats)
            res = self.cascade.score(query, cands, keep_points=keep_points)
            for k, v in self.cascade.stats.items():
                self._time(k, v - before.get(k, 0.0))
            return res
        from .cascade import pair_result

        vc = self.conf["verify"]
        rule = None if self.conf["verdict"] is None else {"min_inlier_ratio": 0.0, "min_spread": 0.0, **self.conf["verdict"],
                                                          "min_inliers": int(self.conf["min_inliers"])}
        out: List[Dict[str, Any]] = []
        qsize = None if self.matcher.detector_free else np.asarray(query["image_size"]).reshape(2)
        for start in range(0, len(cands), 32):
            block = cands[start : start + 32]
            t = time.perf_counter()
            matched = self.matcher.match_many(query, block)
            self._time("match_s", time.perf_counter() - t)
            t = time.perf_counter()
            for cand, res in zip(block, matched):
                corr = res if self.matcher.detector_free else correspondences(query, cand, res)
                a, b = corr["keypoints0"], corr["keypoints1"]
                v = verify(a, b, self.conf["model"], **vc)
                if rule is None:
                    why = {"verified": v.score >= int(self.conf["min_inliers"]), "reason": None}
                else:
                    why = v.verdict(a, image_size0=qsize if qsize is not None else (query.shape[1], query.shape[0]), rule=rule)
                out.append(pair_result(v, a, b, len(a), why, 1, keep_points))
            self._time("fit_s", time.perf_counter() - t)
            self._time("pairs", len(block))
            self._time("fitted", len(block))
        return out

    def _time(self, key: str, value: float) -> None:
        with self._timing_lock:
            self.timing[key] = self.timing.get(key, 0.0) + value

    def rerank(self, entry, ids: np.ndarray, scores: Optional[np.ndarray] = None, top: int = 100) -> np.ndarray:
        """The engine's call: re-order the ranked gallery rows ``ids`` of query ``entry`` (an ``Entry``)."""
        return self.rerank_item(self.query_item(entry), ids, top)

    def expand_verified(self, new: np.ndarray, qvec: np.ndarray, search, k: int, exclude: Optional[int] = None,
                        scores: Optional[Dict[int, float]] = None, results: Optional[Dict[int, Dict[str, Any]]] = None) -> np.ndarray:
        """Spatially verified query expansion (Chum et al., ICCV 2007), after :meth:`rerank_item` gave ``new``.

        With ``conf['sv_qe']`` (``{"k": K, "weight": W}``): the query's global vector plus W times each of its first K
        verified results' (cosine indexes), re-normalised, searches the gallery again with ``search`` (the graph stage
        the shortlist came from, less its alpha-QE: the verified results are the expansion); the verified results keep
        the front, by inliers as re-ranking put them, and the new
        ranking follows. A query with no verified result keeps ``new``. Returns as many rows as ``new`` (-1 padded).
        ``scores`` (row -> score of the first search), when given, takes the second search's scores of rows it lacks.
        ``results``: the verdicts of the re-ranking that gave ``new`` (default: the last :meth:`rerank_item`'s).
        """
        conf = self.conf.get("sv_qe")
        new = np.asarray(new, np.int64)
        if not conf or getattr(self.index, "metric", None) != "cosine" or not hasattr(self.index, "descriptor_rows"):
            return new
        results = self.last_results if results is None else results
        ver = [int(i) for i in new if i >= 0 and (results.get(int(i)) or {}).get("verified")]
        if not ver:
            return new
        use = ver[: int(conf.get("k", 10))]
        x = np.asarray(self.index.descriptor_rows(np.array(use, np.int64)), np.float32)
        q = np.asarray(qvec, np.float32).reshape(1, -1)
        q2 = q + float(conf.get("weight", 1.0)) * x.sum(0, keepdims=True)
        q2 /= max(float(np.linalg.norm(q2)), 1e-12)
        ex = None if exclude is None or exclude < 0 else np.array([int(exclude)])
        # the verified results replace alpha-QE: the second search keeps the rest of the graph stage (DBA, diffusion)
        s2, ids2 = getattr(search, "without_qe", search)(q2, int(k), exclude=ex)
        if scores is not None:
            for i, v in zip(ids2[0], s2[0]):
                if i >= 0:
                    scores.setdefault(int(i), float(v))
        seen = set(ver)
        rest = [int(i) for i in ids2[0] if i >= 0 and int(i) not in seen]
        out = np.full(len(new), -1, np.int64)
        merged = (ver + rest)[: len(new)]
        out[: len(merged)] = merged
        return out

    def rerank_image(self, img: np.ndarray, ids: np.ndarray, scores: Optional[np.ndarray] = None, top: int = 100) -> np.ndarray:
        """Re-order ``ids`` for a query given as an RGB image (e.g. a query cropped to its box), in the frame
        :meth:`query_frame` gives it."""
        return self.rerank_item(self.query_views(img), ids, top)

    def query_frame(self, img: np.ndarray) -> np.ndarray:
        """``img`` (full resolution) reduced as the gallery's images were for their local features."""
        from ..data import resize_max_side

        side = self._max_side()
        return resize_max_side(img, side) if side else img

    def query_images(self, paths: Sequence, top_k: int = 10, top: int = 100,
                     failures: Optional[List[Dict[str, Any]]] = None, with_matches: bool = False,
                     expand: Any = "index") -> List[Dict[str, Any]]:
        """Like ``Index.query_images``, re-ranked; each re-ranked result carries its ``inliers`` and ``verified``.

        ``failures``: as in ``Index.query_images`` (a list: unreadable queries are appended there as
        ``{"path", "cause", "position"}`` and the others answered; None: the first one raises).
        ``with_matches``: verified results also carry ``match``: the inliers as ``points0`` (query) and ``points1``
        (result) in the frames ``size0`` / ``size1`` (``(W, H)`` of the images the features were extracted from),
        what ``--grid`` draws.
        """
        from ..data import decode_image

        if int(top_k) < 1:
            raise CbirError(f"top_k must be a positive number of results, got {top_k}")
        idx = self.index
        ext = idx.extractor
        # the shortlist is the graph stage's ranking, as `cbir query` without --rerank gives
        search = idx.searcher(expand) if hasattr(idx, "searcher") else idx.search
        out = []
        for pos, p in enumerate(paths):
            t0 = time.time()
            try:
                _, vec = idx.describe_images([decode_image(p, max_side=ext.max_side)])
                k = min(len(idx), max(int(top_k), int(top)))
                s, ids = search(vec, k)
                views = self.query_views(self._image(p))
            except CbirError as err:
                query_failed(failures, p, pos, err)
                continue
            score_of = {int(i): float(v) for i, v in zip(ids[0], s[0]) if i >= 0}
            rr = self.rerank_query(views, ids[0], top=top, qvec=vec[0], search=search, k=k, scores=score_of,
                                   keep_points=bool(with_matches))
            new = rr.ids
            qsize = _frame(views[0] if isinstance(views, QueryViews) else views)
            results = []
            for r, i in enumerate([int(i) for i in new if i >= 0][: int(top_k)]):
                row = idx.result(i, score_of[i], r + 1)
                if i in rr.inliers and rr.inliers[i] >= 0:
                    res = rr.results[i]
                    row["inliers"] = rr.inliers[i]
                    row["verified"] = bool(res["verified"])
                    if with_matches and res["verified"] and "points0" in res:
                        row["match"] = {"points0": np.round(res["points0"], 1).tolist(), "points1": np.round(res["points1"], 1).tolist(),
                                        "size0": qsize, "size1": _frame(self._candidate(i))}
                results.append(row)
            row_q = query_row(idx, p)
            out.append({"query": str(p), "query_label": None if row_q is None else idx.labels[row_q],
                        "seconds": round(time.time() - t0, 4), "results": results})
        return out

    def describe(self) -> Dict[str, Any]:
        """What the report records about the re-ranking, with ``timing``: seconds and counts per stage so far
        (``read_s`` candidate features, ``match_s`` matching, ``fit_s`` first-stage fits, ``second_s`` the second
        stage; ``pairs``, ``fitted``, ``second``, ``queries``) and each stage's ``share`` of their sum."""
        t = {k: (round(v, 4) if k.endswith("_s") else int(v)) for k, v in sorted(self.timing.items())}
        total = sum(v for k, v in self.timing.items() if k.endswith("_s"))
        share = {k[:-2]: round(v / total, 3) for k, v in sorted(self.timing.items()) if k.endswith("_s")} if total > 0 else {}
        return {
            "name": self.name,
            "features": None if self.matcher.detector_free else self.features,
            "projected": self.projected,
            "matcher_conf": dict(self.matcher.conf) if self.cascade is None else dict(self.conf["matcher_conf"]),
            "model": self.conf["model"],
            "verify": dict(self.conf["verify"]),
            "min_inliers": int(self.conf["min_inliers"]),
            "verdict": None if self.conf["verdict"] is None else dict(self.conf["verdict"]),
            "max_keypoints": self.conf["max_keypoints"],
            "rotations": list(self.conf["rotations"]),
            "cascade": None if self.cascade is None else self.cascade.describe(),
            "timing": {**t, "share": share},
        }

    def close(self) -> None:
        """Nothing to release: the store stays open for the next re-ranker of the same index (see :func:`shared_store`)."""


def strongest(feats: Dict[str, np.ndarray], k: Optional[int]) -> Dict[str, np.ndarray]:
    """The ``k`` keypoints of highest score (all when ``k`` is falsy or there are fewer)."""
    if not k or len(feats["scores"]) <= int(k):
        return feats
    o = np.argsort(-np.asarray(feats["scores"]), kind="stable")[: int(k)]
    return {**feats, "keypoints": feats["keypoints"][o], "descriptors": feats["descriptors"][o], "scores": feats["scores"][o]}


def _prepared(feats: Dict[str, np.ndarray], k: Optional[int]) -> Dict[str, np.ndarray]:
    """Features as matchers read them: float32, unit descriptors, the ``k`` strongest keypoints."""
    from .compact import as_float32

    f = as_float32(strongest(feats, k))
    d = f["descriptors"]
    if d.size:
        f["descriptors"] = np.ascontiguousarray(d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12), dtype=np.float32)
    return f


def _frame(item: Any) -> Optional[List[int]]:
    """``[W, H]`` of the frame a features dict (or image) is in."""
    if isinstance(item, dict):
        return [int(x) for x in np.asarray(item["image_size"]).reshape(2)]
    if isinstance(item, np.ndarray) and item.ndim >= 2:
        return [int(item.shape[1]), int(item.shape[0])]
    return None


def query_row(index, path) -> Optional[int]:
    """The gallery row of the image file ``path`` (None when it is not in the gallery): by resolved path. An opened
    index answers from its own table (:meth:`cbir.index.gallery.Gallery.row_of_path`); a bare one is scanned."""
    if hasattr(index, "row_of_path"):
        return index.row_of_path(path)
    from pathlib import Path

    paths = np.asarray(index.paths, dtype=object)
    hits = np.flatnonzero(paths == str(Path(path).resolve()))
    return int(hits[0]) if len(hits) else None


class _FeatureCache:
    """LRU cache of prepared features (or images) bounded by ``cache_mb``."""

    def __init__(self, cache_mb: int) -> None:
        self.limit = int(cache_mb) << 20
        self.items: "OrderedDict[Any, Any]" = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()  # re-rankers of one index share it, from any number of threads

    @staticmethod
    def _size(item: Any) -> int:
        return sum(np.asarray(v).nbytes for v in item.values()) if isinstance(item, dict) else np.asarray(item).nbytes

    def get(self, key):
        with self._lock:
            item = self.items.get(key)
            if item is not None:
                self.items.move_to_end(key)
            return item

    def put(self, key, item):
        size = self._size(item)
        with self._lock:
            if key in self.items:
                self.bytes -= self._size(self.items.pop(key))
            self.items[key] = item
            self.bytes += size
            while self.bytes > self.limit and len(self.items) > 1:
                _, old = self.items.popitem(last=False)
                self.bytes -= self._size(old)
        return item


#: open ``local.h5`` files by (path, size, mtime) -> (the store, its feature cache): re-rankers of one index share them
_STORES: Dict[Any, Any] = {}
_STORES_LOCK = threading.Lock()
#: at most this many stay open (a service with many indexes does not hold every file forever)
MAX_SHARED_STORES = 8


def shared_store(index):
    """``local.h5`` of ``index``, opened (and checked against the manifest) once per file version and process."""
    return shared_features(index)[0]


def shared_features(index, cache_mb: int = 256):
    """``(store, feature cache)`` of ``index``'s ``local.h5``: opened (and checked against the manifest) once per file
    version and process, the cache (its size set by the first re-ranker, ``cache_mb``) shared with it."""
    from .store import LocalFeatureStore

    path = Path(index.folder) / "local.h5"
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        key = None
    with _STORES_LOCK:
        if key is not None and key in _STORES:
            return _STORES[key]
        store = index.open_local() if hasattr(index, "open_local") else LocalFeatureStore(path, mode="r")
        pair = (store, _FeatureCache(int(cache_mb)))
        if key is not None:
            # an older version of the same file, and the least recently opened beyond MAX_SHARED_STORES, leave the cache
            # (re-rankers still holding one keep using it; h5py closes a file when its last user goes)
            stale = [k for k in _STORES if k[0] == key[0]] + list(_STORES)[: max(0, len(_STORES) - MAX_SHARED_STORES + 1)]
            for k in dict.fromkeys(stale):
                _STORES.pop(k, None)
            _STORES[key] = pair
        return pair


def _detector_free(name: str) -> bool:
    from . import load_plugins
    from .base import MATCHERS

    load_plugins()
    return bool(MATCHERS.get(name).detector_free)

