"""Named configurations of local features (``--local NAME``) and re-rankers (``--rerank NAME``), as in hloc's ``confs``.

A local-feature conf names a registered extractor and everything that decides what ``local.h5`` holds: keypoint count,
working size, descriptor projection and storage dtypes. A re-ranking conf names the first-stage matcher, the model fit,
the verdict rule and the optional second stage. Plain extractor names (``--local xfeat``) keep :data:`LOCAL_DEFAULTS`
and float32 storage; plain matcher names (``--rerank lighterglue``) keep the single-stage re-ranker of before.

Why these defaults (benchmarks/rerank.py, benchmarks/results/rerank.json; ukbench56 from a pooled ALIKED-n16 ranking,
mAP 0.812, top 55 re-ranked, leave-one-out, 2 shared cores):

* RootSIFT, because UKBench turns its objects in the image plane and SIFT is rotation invariant while XFeat and ALIKED
  are not: the cascade reaches mAP 0.985 on RootSIFT, 0.860 on XFeat (LighterGlue second stage); XFeat + LighterGlue
  on 256 keypoints for every pair 0.875 at 1.06 s per query. In a first exploration (mutual NN + MAGSAC, floors 8-20)
  XFeat stayed at 0.85-0.89 and ALIKED-n16rot at 0.88-0.93 with 128 to 1024 keypoints.
* 256 keypoints projected to 24 dimensions (cbir.local.compact) in float16, uint16 keypoints: 15.1 KB per image in
  local.h5 and the same mAP (0.985) as the 128-d float16 descriptors of the same keypoints (68 KB per image); 128
  keypoints lost 0.01-0.03 in the exploration, 1024 SIFT keypoints in float32 (467 KB) gave 0.965 with ``mnn``.
* First stage: a pair is fitted only when 12 of its mutual matches pass Lowe's ratio 0.8 (72% of ukbench56's pairs and
  48% of corel1k's do not: chance matches), on its matches within ratio 0.9, by one MAGSAC++ run (2000 iterations);
  accepted at 12 inliers with a well-conditioned model. cv2.RANSAC cost 10x more here, USAC_FAST lost 0.01 mAP.
* Second stage: the open candidates (8 to 11 inliers, or more with a model that failed the conditioning; at most 5 per
  query) are fitted again precisely (USAC_ACCURATE, 4 restarts) and accepted at 10: +0.011 mAP on ukbench56 (0.974
  with the first stage alone) for 1-2% of the time, and corel1k's mAP unchanged over all 1000 queries (0.90425 ->
  0.90427).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Tuple

from ..errors import CbirError
from .compact import STORAGE_COMPACT

#: extraction defaults of a plain extractor name (``--local sift``): the 1024 strongest keypoints at up to 1024 px
LOCAL_DEFAULTS: Dict[str, Any] = {"max_keypoints": 1024, "max_side": 1024}

#: ``--local NAME``: extractor + its conf, ``max_side``, ``project`` (cbir.local.compact) and ``storage`` dtypes
LOCAL_CONFS: Dict[str, Dict[str, Any]] = {
    "default": {
        "features": "rootsift",
        "conf": {"max_keypoints": 256, "max_side": 1024, "project": {"basis": "rootsift-skimage12", "dim": 24},
                 "storage": dict(STORAGE_COMPACT)},
    },
    # the same keypoints with the full 128-d RootSIFT in float16 (67 KB per image): for a side-by-side comparison
    "rootsift-256-fp16": {
        "features": "rootsift",
        "conf": {"max_keypoints": 256, "max_side": 1024, "storage": dict(STORAGE_COMPACT)},
    },
    # learned features for a LightGlue second stage, compact storage (xfeat: 64-d float16, 128 keypoints: 18.5 KB)
    "xfeat-compact": {
        "features": "xfeat",
        "conf": {"max_keypoints": 128, "max_side": 1024, "storage": dict(STORAGE_COMPACT)},
    },
}

#: the first stage of every cascade: batched mutual NN + one MAGSAC++ fit per candidate with enough matches
_FAST_FIT: Dict[str, Any] = {"method": "magsac", "threshold": 3.0, "restarts": 1, "max_iters": 2000, "confidence": 0.999}

#: ``--rerank NAME``: cascade re-rankers (``stages``) and named single-stage recipes
RERANK_CONFS: Dict[str, Dict[str, Any]] = {
    "default": {
        "matcher": "mnn",
        "cascade": True,
        # fit only pairs with >= min_matches mutual matches within Lowe's ratio 0.8 (72% of ukbench56's pairs are not),
        # on their matches within 0.9
        "matcher_conf": {"ratio_gate": 0.8, "fit_ratio": 0.9},
        "model": "homography",
        "verify": dict(_FAST_FIT),
        "min_matches": 12,  # fewer: no fit at all (score 0)
        "min_inliers": 12,  # accepted by the first stage
        "verdict": {"min_inlier_ratio": 0.0, "max_scale": 8.0},
        "second": {
            "open_from": 8,  # not accepted by the first stage with >= 8 inliers: the decision is open
            "matcher": "auto",  # the learned matcher of the features when there is one, else a precise refit
            "verify": {"method": "accurate", "restarts": 4},
            "min_inliers": 10,
            "max_candidates": 5,  # per query, the open ones with most first-stage inliers (corel1k: 10 per query were open)
        },
        # spatially verified query expansion: the query + its first 10 verified results search again (Paris6k protocol,
        # benchmarks/suite.py --rerank: mAP 0.921 -> 0.957 at 0.22 s per query for the top 100; re-ordering alone 0.922)
        "sv_qe": {"k": 10, "weight": 1.0},
    },
    # the first stage alone (no second opinion on open candidates)
    "fast": {
        "matcher": "mnn",
        "cascade": True,
        "matcher_conf": {"ratio_gate": 0.8, "fit_ratio": 0.9},
        "model": "homography",
        "verify": dict(_FAST_FIT),
        "min_matches": 12,
        "min_inliers": 12,
        "verdict": {"min_inlier_ratio": 0.0, "max_scale": 8.0},
        "second": None,
    },
    # seed 000 (DELF recipe): kd-tree NN within 0.8 from the candidate into the query, affine RANSAC exactly as the seed
    # (skimage, 3 samples, 20 px, 1000 trials), one pair at a time
    "seed000": {
        "matcher": "kdtree",
        "matcher_conf": {"distance_upper_bound": 0.8},
        "model": "affine",
        "verify": {"min_samples": 3, "residual_threshold": 20.0, "max_trials": 1000, "backend": "skimage"},
        "min_inliers": 15,
        "verdict": None,  # the seed ranks by inlier count alone
        "cascade": False,
    },
}

#: learned matchers by features, for ``second.matcher == "auto"``
LEARNED_MATCHERS: Dict[str, str] = {"xfeat": "lighterglue", "aliked": "lightglue", "aliked-n16rot": "lightglue", "disk": "lightglue"}


def local_conf(name: str) -> Tuple[str, Dict[str, Any]]:
    """``(extractor name, conf)`` of ``--local NAME``: a named conf, else the registered extractor with :data:`LOCAL_DEFAULTS`."""
    if name in LOCAL_CONFS:
        c = LOCAL_CONFS[name]
        return c["features"], copy.deepcopy(c["conf"])
    return name, dict(LOCAL_DEFAULTS)


def rerank_conf(name: str) -> Optional[Dict[str, Any]]:
    """A copy of the named re-ranking conf, or None when ``name`` is not one (a plain matcher name)."""
    c = RERANK_CONFS.get(name)
    return copy.deepcopy(c) if c is not None else None


def local_names() -> list:
    return sorted(LOCAL_CONFS)


def rerank_names() -> list:
    return sorted(RERANK_CONFS)


def check_local_name(name: str) -> None:
    """Raise a clear error when ``name`` is neither a named conf nor a registered extractor."""
    from . import extractor_names

    if name not in LOCAL_CONFS and name not in extractor_names():
        raise CbirError(f"unknown local features {name!r}; choose a named conf ({', '.join(local_names())}) or an extractor "
                        f"({', '.join(extractor_names())})")
