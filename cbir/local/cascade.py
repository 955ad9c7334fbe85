"""The verification cascade: a cheap first stage for every candidate, the expensive one only where it can change the answer.

Stage 1, every candidate of a shortlist at once: mutual nearest neighbours of the query against all candidates in
one padded matrix product (:func:`~cbir.local.mnn.batched_mutual_nn`), then one fast robust fit per candidate
(``cv2.findHomography`` with ``USAC_MAGSAC``, one run) -- skipped when fewer than ``min_matches`` mutual matches
pass Lowe's ratio ``matcher_conf.ratio_gate`` (all mutual matches count when it is None), since a model from a
handful of chance matches is noise; the fit reads the matches within ``matcher_conf.fit_ratio`` (None: every mutual
match). A candidate whose fit passes the verdict
(:func:`~cbir.local.verify.verdict`: at least ``min_inliers`` inliers, the inlier ratio, a well-conditioned model) is
accepted with its inlier count as score.

Stage 2, the open candidates only: those stage 1 did not accept although their fit kept at least ``second.open_from``
inliers (near the floor, or above it with a model that failed the conditioning), at most ``second.max_candidates``
per query, most inliers first. They are matched again by the expensive matcher: the learned matcher of the features when
``second.matcher`` is ``"auto"`` and one exists (LighterGlue for XFeat, LightGlue for ALIKED and DISK) or is named,
with a precise fit (``second.verify``, e.g. USAC_ACCURATE with restarts); for features no learned matcher reads
(RootSIFT, projected descriptors) the stage-1 matches are fitted again precisely (``"refit"``). A candidate is then
accepted when that verdict holds with ``second.min_inliers``.

Every other candidate scores -1 (not verified: it keeps its global rank behind the verified ones). :class:`Cascade`
counts pairs per stage and the seconds each part takes (``stats``), so a report can show every stage's share.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import CbirError
from ..vectors import l2n
from .base import Features, correspondences
from .mnn import batched_mutual_nn
from .verify import Verification, verify


def pair_result(v: Verification, kp0: np.ndarray, kp1: np.ndarray, n_matches: int, why: Mapping[str, Any], stage: int,
                keep_points: bool) -> Dict[str, Any]:
    """What a re-ranker keeps of one verified pair (inlier points only with ``keep_points``)."""
    r = {"stage": stage, "n_matches": int(n_matches), "n_inliers": int(v.score), "verified": bool(why["verified"]),
         "reason": why.get("reason"), "matrix": None if v.matrix is None else v.matrix}
    if keep_points:
        m = np.asarray(v.inliers, bool) if len(v.inliers) == len(kp0) else np.zeros(len(kp0), bool)
        r["points0"], r["points1"] = np.asarray(kp0, np.float32)[m], np.asarray(kp1, np.float32)[m]
    return r


def _none(stage: int = 0, n_matches: int = 0, reason: str = "no model") -> Dict[str, Any]:
    return {"stage": stage, "n_matches": int(n_matches), "n_inliers": 0, "verified": False, "reason": reason, "matrix": None}


class Cascade:
    """The two stages over one query and its candidates' features (see the module docstring).

    ``conf`` is the re-ranker's (``model``, ``verify``, ``min_matches``, ``min_inliers``, ``verdict``, ``second``,
    ``matcher_conf``); ``features`` the stored features' name, ``projected`` whether their descriptors are projected
    (no learned matcher reads those); ``device`` for a learned second-stage matcher.
    """

    def __init__(self, conf: Mapping[str, Any], features: str, projected: bool = False, device: str = "cpu") -> None:
        from .confs import LEARNED_MATCHERS

        self.conf = conf
        self.model = str(conf["model"])
        self.verify_conf = dict(conf.get("verify") or {})
        mc = dict(conf.get("matcher_conf") or {})
        accepted = {"min_similarity", "max_elements", "ratio_gate", "fit_ratio"}
        unknown = sorted(set(mc) - accepted)
        if unknown:
            raise CbirError(f"cascade first stage (batched mnn): unknown matcher option(s) {unknown}; accepted: {sorted(accepted)}")
        self.min_similarity = mc.get("min_similarity")
        self.max_elements = int(mc.get("max_elements", 4_000_000))
        # a pair is fitted when at least min_matches of its mutual matches pass Lowe's ratio ratio_gate (None: count all);
        # the fit reads the matches within fit_ratio (None: every mutual match)
        self.ratio_gate = mc.get("ratio_gate")
        self.fit_ratio = mc.get("fit_ratio")
        self.second = dict(conf["second"]) if conf.get("second") else None
        self.second_matcher = None
        self.second_name = None
        if self.second is not None:
            name = self.second.get("matcher", "auto")
            if name == "auto":
                name = None if projected else LEARNED_MATCHERS.get(features)
            elif name in (None, "refit"):
                name = None
            elif projected:
                raise CbirError(f"cascade second stage: {name!r} cannot read projected descriptors; use 'refit' or 'auto'")
            if name is not None:
                from . import build_matcher

                self.second_matcher = build_matcher(name, features=features, device=device, **(self.second.get("matcher_conf") or {}))
            self.second_name = name or "refit"
        self.stats: Dict[str, float] = {}

    def _add(self, key: str, value: float) -> None:
        self.stats[key] = self.stats.get(key, 0.0) + value

    def _rule(self, min_inliers: int) -> Dict[str, Any]:
        return {"min_inlier_ratio": 0.0, "min_spread": 0.0, **dict(self.conf.get("verdict") or {}), "min_inliers": int(min_inliers)}

    def score(self, query: Features, candidates: Sequence[Optional[Features]], keep_points: bool = False) -> List[Dict[str, Any]]:
        """One result per candidate (None: no features, scores as unverified): ``stage`` (0 none, 1 or 2: the stage
        that decided), ``n_matches``, ``n_inliers``, ``verified``, ``reason``, ``matrix`` and with ``keep_points``
        the inliers' ``points0`` (query) and ``points1`` (candidate)."""
        out: List[Dict[str, Any]] = [_none() for _ in candidates]
        present = [k for k, c in enumerate(candidates) if c is not None]
        self._add("pairs", len(candidates))
        if not present:
            return out
        qkp = np.asarray(query["keypoints"], np.float32).reshape(-1, 2)
        qsize = tuple(int(x) for x in np.asarray(query["image_size"]).reshape(2))
        t = time.perf_counter()
        qd = l2n(query["descriptors"])
        cds = [l2n(candidates[k]["descriptors"]) for k in present]
        with_ratio = self.ratio_gate is not None or self.fit_ratio is not None
        matches = batched_mutual_nn(qd, cds, max_elements=self.max_elements, min_similarity=self.min_similarity, with_ratio=with_ratio)
        self._add("match_s", time.perf_counter() - t)

        # stage 1: one fast fit per candidate with enough matches
        t = time.perf_counter()
        rule1 = self._rule(int(self.conf["min_inliers"]))
        min_matches = int(self.conf.get("min_matches") or 0)
        first: Dict[int, Any] = {}
        for k, m in zip(present, matches):
            i0, i1 = m[0], m[1]
            gated = len(i0) if self.ratio_gate is None else int((m[3] <= float(self.ratio_gate)).sum())
            if gated < max(min_matches, 1):
                out[k] = _none(1, len(i0), f"{gated} matches < {min_matches}")
                continue
            if self.fit_ratio is not None:
                keep = m[3] <= float(self.fit_ratio)
                i0, i1 = i0[keep], i1[keep]
            ckp = np.asarray(candidates[k]["keypoints"], np.float32).reshape(-1, 2)
            a, b = qkp[i0], ckp[i1]
            v = verify(a, b, self.model, **self.verify_conf)
            why = v.verdict(a, image_size0=qsize, rule=rule1)
            out[k] = pair_result(v, a, b, len(i0), why, 1, keep_points)
            first[k] = (a, b)
            self._add("fitted", 1)
        self._add("fit_s", time.perf_counter() - t)

        # stage 2: the open candidates, best first
        if self.second is None:
            return out
        lo = int(self.second.get("open_from", 0))
        open_ = [k for k in first if not out[k]["verified"] and out[k]["n_inliers"] >= max(lo, 1)]
        open_.sort(key=lambda k: (-out[k]["n_inliers"], k))
        open_ = open_[: int(self.second.get("max_candidates") or len(open_))]
        if not open_:
            return out
        t = time.perf_counter()
        rule2 = self._rule(int(self.second.get("min_inliers", self.conf["min_inliers"])))
        vc2 = {**self.verify_conf, **dict(self.second.get("verify") or {})}
        if self.second_matcher is not None:
            results = self.second_matcher.match_many(query, [candidates[k] for k in open_])
            pairs = [(k, correspondences(query, candidates[k], res)) for k, res in zip(open_, results)]
            pairs = [(k, c["keypoints0"], c["keypoints1"]) for k, c in pairs]
        else:
            pairs = [(k, *first[k]) for k in open_]
        for k, a, b in pairs:
            v = verify(a, b, self.model, **vc2)
            why = v.verdict(a, image_size0=qsize, rule=rule2)
            if why["verified"] or self.second_matcher is not None:
                out[k] = pair_result(v, a, b, len(a), why, 2, keep_points)
            else:
                out[k] = {**out[k], "stage": 2, "reason": why.get("reason")}
        self._add("second", len(open_))
        self._add("second_s", time.perf_counter() - t)
        return out

    def describe(self) -> Dict[str, Any]:
        return {"first": {"matcher": "mnn (batched)", "model": self.model, "verify": self.verify_conf,
                          "min_matches": int(self.conf.get("min_matches") or 0), "min_inliers": int(self.conf["min_inliers"])},
                "second": None if self.second is None else {**self.second, "matcher": self.second_name}}
