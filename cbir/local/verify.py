"""Geometric verification of putative matches: homography, affine or fundamental matrix, score = inlier count.

Every model maps image 0 to image 1 (``p1 ~ M p0``; for ``fundamental``, ``p1^T F p0 = 0``). Fewer putative matches
than the model needs, a degenerate sample or a failed estimate give score 0 and model None; nothing raises for
unlucky data.

* ``homography``: ``cv2.findHomography`` (4 matches at least) with ``method``: ``'accurate'`` (default,
  ``cv2.USAC_ACCURATE``: GC-RANSAC with local optimisation, 1 px), ``'magsac'`` (``cv2.USAC_MAGSAC``, MAGSAC++, 3 px)
  or ``'ransac'`` (``cv2.RANSAC``, 2 px); ``threshold=None`` takes the method's default. The estimate is run
  ``restarts`` times on seeded permutations of the matches and the model with most inliers is kept: a single run of
  OpenCV's local optimisation sometimes settles on a slightly wrong model with visibly fewer inliers.
  Measured on Oxford graf (benchmarks/matching.py): MAGSAC++'s sigma-weighted fit lands 2.8-4 px (mean corner error)
  from the ground truth at K=3 with SIFT, ALIKED and DISK, while USAC_ACCURATE at 1 px with 4 restarts stays under
  2.1 px there for SIFT, ALIKED and XFeat over 10 seeds.
* ``affine``: seed 000's recipe, 3 samples, 20 px residual, 1000 trials. ``backend='opencv'`` (default, fast:
  ``cv2.estimateAffine2D`` with RANSAC and those parameters) or ``'skimage'`` (``skimage.measure.ransac`` with
  ``AffineTransform``, exactly as the seed; deterministic through ``seed``).
* ``fundamental``: ``cv2.findFundamentalMat`` with ``cv2.USAC_MAGSAC`` (8 matches at least).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import numpy as np

from ..errors import CbirError
from .base import merge_conf

MIN_MATCHES = {"homography": 4, "affine": 3, "fundamental": 8}

DEFAULT_CONF: Dict[str, Dict[str, Any]] = {
    "homography": {"method": "accurate", "threshold": None, "confidence": 0.9999, "max_iters": 10000, "restarts": 4, "seed": 0},
    "affine": {"min_samples": 3, "residual_threshold": 20.0, "max_trials": 1000, "confidence": 0.999, "backend": "opencv", "seed": 0},
    "fundamental": {"threshold": 1.0, "confidence": 0.9999, "max_iters": 10000},
}


@dataclass
class Verification:
    """Result of :func:`verify`: the model matrix (3x3, or None), the inlier mask over the input matches, the score."""

    model: str
    matrix: Optional[np.ndarray]
    inliers: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def score(self) -> int:
        return int(self.inliers.sum()) if self.matrix is not None else 0

    def to_dict(self) -> Dict[str, Any]:
        return {"model": self.model, "matrix": None if self.matrix is None else self.matrix.tolist(), "n_inliers": self.score}


def models() -> list:
    return sorted(DEFAULT_CONF)


def verify(kpts0, kpts1, model: str = "homography", **conf: Any) -> Verification:
    """Fit ``model`` to matched points ``kpts0`` -> ``kpts1`` (``(M, 2)`` each) robustly; see the module docstring."""
    if model not in DEFAULT_CONF:
        raise CbirError(f"unknown verification model {model!r}; choose one of: {', '.join(models())}")
    c = merge_conf(DEFAULT_CONF[model], conf, f"verification {model!r}")
    p0 = np.asarray(kpts0, np.float64).reshape(-1, 2)
    p1 = np.asarray(kpts1, np.float64).reshape(-1, 2)
    if p0.shape != p1.shape:
        raise CbirError(f"verification: {len(p0)} points in image 0 but {len(p1)} in image 1")
    n = p0.shape[0]
    finite = np.isfinite(p0).all(1) & np.isfinite(p1).all(1)
    need = int(c.get("min_samples", MIN_MATCHES[model])) if model == "affine" else MIN_MATCHES[model]
    none = Verification(model, None, np.zeros(n, bool))
    if int(finite.sum()) < max(need, MIN_MATCHES[model]):
        return none
    try:
        matrix, mask = _FIT[model](p0[finite], p1[finite], c)
    except CbirError:
        raise
    except Exception:  # cv2.error on degenerate input (collinear points, ...): no model, not a crash
        return none
    if matrix is None or mask is None or not np.isfinite(matrix).all():
        return none
    inliers = np.zeros(n, bool)
    inliers[np.nonzero(finite)[0]] = np.asarray(mask, bool).reshape(-1)
    return Verification(model, np.asarray(matrix, np.float64), inliers)


#: homography method -> (OpenCV flag name, default threshold in pixels)
HOMOGRAPHY_METHODS = {"accurate": ("USAC_ACCURATE", 1.0), "magsac": ("USAC_MAGSAC", 3.0), "ransac": ("RANSAC", 2.0)}


def _homography(p0: np.ndarray, p1: np.ndarray, c: Mapping[str, Any]):
    import cv2

    if c["method"] not in HOMOGRAPHY_METHODS:
        raise CbirError(f"verification 'homography': method must be one of {sorted(HOMOGRAPHY_METHODS)}, got {c['method']!r}")
    flag, default_th = HOMOGRAPHY_METHODS[c["method"]]
    th = default_th if c["threshold"] is None else float(c["threshold"])
    best_H, best_mask, best_n = None, None, -1
    rng = np.random.default_rng(int(c["seed"]))
    for r in range(max(1, int(c["restarts"]))):
        # OpenCV's samplers are seeded per call: a permutation of the matches gives an independent restart
        order = np.arange(len(p0)) if r == 0 else rng.permutation(len(p0))
        H, mask = cv2.findHomography(
            p0[order], p1[order], getattr(cv2, flag), ransacReprojThreshold=th, maxIters=int(c["max_iters"]), confidence=float(c["confidence"])
        )
        if H is None or mask is None or H.shape != (3, 3) or abs(H[2, 2]) < 1e-12:
            continue
        n = int(np.count_nonzero(mask))
        if n > best_n:
            inliers = np.zeros(len(p0), bool)
            inliers[order] = mask.reshape(-1) > 0
            best_H, best_mask, best_n = H / H[2, 2], inliers, n
    return best_H, best_mask


def _affine(p0: np.ndarray, p1: np.ndarray, c: Mapping[str, Any]):
    if c["backend"] == "skimage":
        return _affine_skimage(p0, p1, c)
    if c["backend"] != "opencv":
        raise CbirError(f"verification 'affine': backend must be 'opencv' or 'skimage', got {c['backend']!r}")
    import cv2

    cv2.setRNGSeed(int(c["seed"]))
    A, mask = cv2.estimateAffine2D(
        p0, p1, method=cv2.RANSAC, ransacReprojThreshold=float(c["residual_threshold"]),
        maxIters=int(c["max_trials"]), confidence=float(c["confidence"]), refineIters=10,
    )
    if A is None:
        return None, None
    return np.vstack([A, [0.0, 0.0, 1.0]]), mask


def _affine_skimage(p0: np.ndarray, p1: np.ndarray, c: Mapping[str, Any]):
    import warnings

    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage deprecation chatter about estimate()
        model, inliers = ransac(
            (p0, p1), AffineTransform, min_samples=int(c["min_samples"]), residual_threshold=float(c["residual_threshold"]),
            max_trials=int(c["max_trials"]), rng=int(c["seed"]),
        )
    if model is None or inliers is None:
        return None, None
    return np.asarray(model.params, np.float64), inliers


def _fundamental(p0: np.ndarray, p1: np.ndarray, c: Mapping[str, Any]):
    import cv2

    F, mask = cv2.findFundamentalMat(
        p0, p1, cv2.USAC_MAGSAC, ransacReprojThreshold=float(c["threshold"]), confidence=float(c["confidence"]), maxIters=int(c["max_iters"])
    )
    if F is None or F.shape != (3, 3):  # 7-point may return several stacked solutions
        return None, None
    return F, mask


_FIT = {"homography": _homography, "affine": _affine, "fundamental": _fundamental}


def corner_error(H_est, H_gt, width: int, height: int) -> float:
    """Mean distance of the image corners ``(0,0), (W-1,0), (W-1,H-1), (0,H-1)`` mapped by both homographies (inf if none)."""
    if H_est is None:
        return float("inf")
    corners = np.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]], np.float64)
    return float(np.linalg.norm(apply_homography(H_est, corners) - apply_homography(H_gt, corners), axis=1).mean())


def apply_homography(H, pts) -> np.ndarray:
    """Map ``(N, 2)`` points by the 3x3 homography ``H``."""
    pts = np.asarray(pts, np.float64).reshape(-1, 2)
    q = np.hstack([pts, np.ones((len(pts), 1))]) @ np.asarray(H, np.float64).T
    return q[:, :2] / q[:, 2:3]
