"""Match two images end to end: extract, match, verify; a JSON-able result, optionally drawn.

>>> r = match_files("img1.png", "img2.png", features="aliked", matcher="lightglue")   # doctest: +SKIP
>>> r["n_inliers"], r["homography"]                                                   # doctest: +SKIP

Images larger than ``max_side`` are shrunk for the networks; every returned coordinate and model is in the pixel
frame of the images as given (pixel centres on integers). Torch threads are the caller's business.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..errors import CbirError
from .base import KeypointExtractor, Matcher, as_rgb8, check_combination, correspondences, empty_correspondences
from .verify import verify

DEFAULT_MAX_SIDE = 1024

def shrink_to_side(image: np.ndarray, max_side: Optional[int]) -> Tuple[np.ndarray, np.ndarray]:
    """The image shrunk to ``max_side`` and the per-axis factor back to the original frame."""
    from ..data import resize_max_side

    if not max_side or max(image.shape[:2]) <= max_side:
        return image, np.ones(2, np.float32)
    small = resize_max_side(image, int(max_side))
    h, w = image.shape[:2]
    hs, ws = small.shape[:2]
    return small, np.array([w / ws, h / hs], np.float32)


def to_original_frame(kpts: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Pixel-centre-preserving rescale: ``(p + 0.5) * s - 0.5``."""
    if np.all(scale == 1):
        return kpts
    return ((kpts + 0.5) * scale - 0.5).astype(np.float32)


def _names(features, matcher) -> Tuple[Optional[str], str]:
    fname = features.name if isinstance(features, KeypointExtractor) else (None if features in (None, "", "none") else str(features))
    mname = matcher.name if isinstance(matcher, Matcher) else str(matcher)
    return fname, mname


def match_images(
    img0: np.ndarray,
    img1: np.ndarray,
    features: Union[str, KeypointExtractor, None] = "aliked",
    matcher: Union[str, Matcher] = "lightglue",
    model: str = "homography",
    weights: Optional[os.PathLike] = None,
    matcher_weights: Optional[os.PathLike] = None,
    max_side: Optional[int] = DEFAULT_MAX_SIDE,
    device: str = "cpu",
    extractor_conf: Optional[Dict[str, Any]] = None,
    matcher_conf: Optional[Dict[str, Any]] = None,
    verify_conf: Optional[Dict[str, Any]] = None,
    verdict_rule: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Match RGB ``uint8`` images ``img0`` and ``img1`` and verify the matches with ``model``.

    ``features`` / ``matcher`` are names (built here, weights resolved offline; ``weights`` is the extractor's
    weight path, ``matcher_weights`` the matcher's) or already built objects, which a caller matching many pairs
    should pass. For a detector-free matcher (``loftr``) use ``features=None``.

    Returns a JSON-able dict: ``features``, ``matcher``, ``model``, ``image_size0/1`` (W, H), ``n_keypoints0/1``,
    ``n_matches``, ``n_inliers``, ``homography`` (3x3 list or None), ``model_matrix`` (the fitted model, any kind),
    ``seconds`` (extract, match, verify, total; model building excluded), ``verified`` and ``verdict`` (whether the
    model is one to trust, the rule and which check failed: :func:`cbir.local.verify.verdict`, ``verdict_rule``
    overrides :data:`~cbir.local.verify.VERDICT_RULE`), and for drawing ``mkpts0``, ``mkpts1`` (matched points),
    ``match_scores`` and ``inliers`` (bool per match).
    """
    from . import load_plugins

    load_plugins()
    fname, mname = _names(features, matcher)
    check_combination(fname, mname if not isinstance(matcher, Matcher) else type(matcher))
    if isinstance(matcher, Matcher) and matcher.features not in (None, fname) and not matcher.detector_free:
        raise CbirError(f"matcher {mname!r} was built for {matcher.features!r} features, not {fname!r}")
    img0, img1 = as_rgb8(img0), as_rgb8(img1)
    extractor = _build_extractor(features, weights, device, extractor_conf)
    m = _build_matcher(matcher, fname, matcher_weights, device, matcher_conf)

    s0, scale0 = shrink_to_side(img0, max_side)
    s1, scale1 = shrink_to_side(img1, max_side)
    seconds: Dict[str, float] = {}
    t = time.perf_counter()
    if m.detector_free:
        n0 = n1 = None
        seconds["extract"] = 0.0
        t = time.perf_counter()
        corr = m.match(s0, s1)
    else:
        f0, f1 = extractor.extract(s0), extractor.extract(s1)
        n0, n1 = len(f0["keypoints"]), len(f1["keypoints"])
        seconds["extract"] = time.perf_counter() - t
        t = time.perf_counter()
        corr = correspondences(f0, f1, m.match(f0, f1)) if n0 and n1 else empty_correspondences()
    seconds["match"] = time.perf_counter() - t
    k0, k1 = to_original_frame(corr["keypoints0"], scale0), to_original_frame(corr["keypoints1"], scale1)

    t = time.perf_counter()
    v = verify(k0, k1, model, **(verify_conf or {}))
    seconds["verify"] = time.perf_counter() - t
    seconds["total"] = seconds["extract"] + seconds["match"] + seconds["verify"]
    why = v.verdict(k0, image_size0=(img0.shape[1], img0.shape[0]), rule=verdict_rule)

    matrix = None if v.matrix is None else v.matrix.tolist()
    return {
        "features": fname,
        "matcher": mname,
        "model": model,
        "image_size0": [int(img0.shape[1]), int(img0.shape[0])],
        "image_size1": [int(img1.shape[1]), int(img1.shape[0])],
        "n_keypoints0": n0,
        "n_keypoints1": n1,
        "n_matches": int(len(k0)),
        "n_inliers": v.score,
        "homography": matrix if model == "homography" else None,
        "model_matrix": matrix,
        "verified": why["verified"],
        "verdict": why,
        "seconds": {k: round(val, 4) for k, val in seconds.items()},
        "mkpts0": np.round(k0, 2).tolist(),
        "mkpts1": np.round(k1, 2).tolist(),
        "match_scores": np.round(corr["scores"].astype(np.float64), 4).tolist(),
        "inliers": v.inliers.astype(bool).tolist(),
    }


def _build_extractor(features, weights, device, conf) -> Optional[KeypointExtractor]:
    if features in (None, "", "none"):
        return None
    if isinstance(features, KeypointExtractor):
        if conf:
            raise CbirError("extractor_conf given with an already built extractor")
        return features
    from . import build_extractor

    return build_extractor(str(features), weights=weights, device=device, **(conf or {}))


def _build_matcher(matcher, fname, weights, device, conf) -> Matcher:
    if isinstance(matcher, Matcher):
        if conf:
            raise CbirError("matcher_conf given with an already built matcher")
        return matcher
    from . import build_matcher

    return build_matcher(str(matcher), features=fname, weights=weights, device=device, **(conf or {}))


def match_files(
    path0: os.PathLike,
    path1: os.PathLike,
    features: Union[str, KeypointExtractor, None] = "aliked",
    matcher: Union[str, Matcher] = "lightglue",
    model: str = "homography",
    out_png: Optional[os.PathLike] = None,
    **kwargs: Any,
) -> Dict[str, Any]:
    """Decode two image files, :func:`match_images` them, and draw the result to ``out_png`` when given."""
    from ..data import decode_image

    img0, img1 = decode_image(path0), decode_image(path1)
    result = match_images(img0, img1, features=features, matcher=matcher, model=model, **kwargs)
    result = {"image0": str(path0), "image1": str(path1), **result}
    if out_png is not None:
        from .draw import draw_matches

        draw_matches(img0, img1, result, out_png)
        result["figure"] = str(out_png)
    return result
