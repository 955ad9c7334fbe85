"""Drawing of a :func:`cbir.local.pair.match_images` result to a PNG (OpenCV only, no GUI).

Top panel: both images side by side, inlier matches as solid green lines, outliers faint red, and the verdict
(verified, or why not). Second panel, when a homography was found (seed 001 §2.3): image 1 warped into image 0's
frame, and the two blended where they overlap, so a correct registration reads as a sharp, ghost-free overlay.

:func:`hit_overlay` draws one re-ranked hit for a result grid: the query and the hit at thumbnail size with the
inlier lines between them, so a person sees what matched.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

GAP = 10
INLIER = (40, 200, 40)
OUTLIER = (230, 50, 50)


def _side_by_side(a: np.ndarray, b: np.ndarray, gap: int = GAP) -> np.ndarray:
    h = max(a.shape[0], b.shape[0])
    canvas = np.full((h, a.shape[1] + gap + b.shape[1], 3), 255, np.uint8)
    canvas[: a.shape[0], : a.shape[1]] = a
    canvas[: b.shape[0], a.shape[1] + gap :] = b
    return canvas


def _label(img: np.ndarray, text: str) -> None:
    import cv2

    (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1)
    cv2.rectangle(img, (4, 4), (12 + w, 12 + h + base), (0, 0, 0), -1)
    cv2.putText(img, text, (8, 8 + h), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1, cv2.LINE_AA)


def _spread(idx: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` of ``idx``, evenly spaced (a readable figure; the counts in the label stay exact)."""
    if len(idx) <= limit:
        return idx
    return idx[np.linspace(0, len(idx) - 1, limit).round().astype(int)]


def matches_panel(img0: np.ndarray, img1: np.ndarray, result: Mapping[str, Any], max_lines: int = 400) -> np.ndarray:
    """Side-by-side images with inliers (solid) and outliers (faint) lines, at most ``max_lines`` of each."""
    import cv2

    canvas = _side_by_side(img0, img1)
    k0 = np.asarray(result.get("mkpts0", []), np.float64).reshape(-1, 2)
    k1 = np.asarray(result.get("mkpts1", []), np.float64).reshape(-1, 2)
    inl = np.asarray(result.get("inliers", np.zeros(len(k0), bool)), bool).reshape(-1)
    if inl.shape[0] != k0.shape[0]:
        inl = np.zeros(k0.shape[0], bool)
    dx = img0.shape[1] + GAP
    faint = canvas.copy()
    for i in _spread(np.nonzero(~inl)[0], max_lines):
        p, q = k0[i], k1[i]
        cv2.line(faint, (int(round(p[0])), int(round(p[1]))), (int(round(q[0] + dx)), int(round(q[1]))), OUTLIER, 1, cv2.LINE_AA)
    canvas = cv2.addWeighted(faint, 0.3, canvas, 0.7, 0.0)
    for i in _spread(np.nonzero(inl)[0], max_lines):
        p, q = (int(round(k0[i][0])), int(round(k0[i][1]))), (int(round(k1[i][0] + dx)), int(round(k1[i][1])))
        cv2.line(canvas, p, q, INLIER, 1, cv2.LINE_AA)
        cv2.circle(canvas, p, 2, INLIER, -1, cv2.LINE_AA)
        cv2.circle(canvas, q, 2, INLIER, -1, cv2.LINE_AA)
    text = f"{result.get('features') or ''}+{result.get('matcher', '')}: {int(inl.sum())} inliers / {len(k0)} matches"
    if "verified" in result:
        v = result.get("verdict") or {}
        text += ", verified" if result["verified"] else f", NOT verified ({v.get('reason') or 'see verdict'})"
    _label(canvas, text)
    return canvas


def overlap_panel(img0: np.ndarray, img1: np.ndarray, H, verified: bool = True) -> Optional[np.ndarray]:
    """Image 1 warped into image 0's frame (``H`` maps 0 -> 1), next to the 50/50 blend of the overlap (labelled
    when the model failed its verdict)."""
    import cv2

    H = np.asarray(H, np.float64)
    try:
        Hinv = np.linalg.inv(H)
    except np.linalg.LinAlgError:
        return None
    h0, w0 = img0.shape[:2]
    warped = cv2.warpPerspective(img1, Hinv, (w0, h0), flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
    valid = cv2.warpPerspective(np.full(img1.shape[:2], 255, np.uint8), Hinv, (w0, h0), flags=cv2.INTER_NEAREST) > 0
    blend = (img0.astype(np.float32) * 0.35).astype(np.uint8)
    blend[valid] = ((img0[valid].astype(np.uint16) + warped[valid].astype(np.uint16)) // 2).astype(np.uint8)
    left, right = warped.copy(), blend
    _label(left, "image 1 warped into image 0" + ("" if verified else " (model NOT verified)"))
    _label(right, f"overlap blend ({100.0 * valid.mean():.0f}% of image 0)")
    return _side_by_side(left, right)


def draw_matches(img0: np.ndarray, img1: np.ndarray, result: Mapping[str, Any], out_png: os.PathLike) -> str:
    """Write the match figure of ``result`` (from :func:`~cbir.local.pair.match_images`) to ``out_png``; returns the path."""
    import cv2

    from .base import as_rgb8

    img0, img1 = as_rgb8(img0), as_rgb8(img1)
    panels = [matches_panel(img0, img1, result)]
    if result.get("homography") is not None:
        p = overlap_panel(img0, img1, result["homography"], verified=bool(result.get("verified", True)))
        if p is not None:
            panels.append(p)
    width = max(p.shape[1] for p in panels)
    rows = []
    for p in panels:
        row = np.full((p.shape[0], width, 3), 255, np.uint8)
        row[:, : p.shape[1]] = p
        rows.append(row)
        rows.append(np.full((GAP, width, 3), 255, np.uint8))
    figure = np.concatenate(rows[:-1], axis=0)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(figure, cv2.COLOR_RGB2BGR)):
        from ..errors import CbirError

        raise CbirError(f"{out}: could not write the figure (is the extension .png?)")
    return str(out)


def hit_overlay(query: Optional[np.ndarray], hit: Optional[np.ndarray], match: Mapping[str, Any], size: int = 200,
                max_lines: int = 40) -> Optional[np.ndarray]:
    """The query and a verified hit with the inlier lines of ``match`` between them: stacked (query on top) when the
    query is landscape, side by side otherwise, each scaled to ``size`` px across the shared side.

    ``match`` is what ``Reranker.query_images(..., with_matches=True)`` puts in a result: ``points0`` / ``points1`` in
    the frames ``size0`` / ``size1`` (``(W, H)``), which may differ from the images given (thumbnails): points are
    scaled to them. Returns None when an image is missing.
    """
    import cv2

    from .base import as_rgb8

    if query is None or hit is None:
        return None
    query, hit = as_rgb8(query), as_rgb8(hit)
    stacked = query.shape[1] >= query.shape[0]
    panels, scales = [], []
    for img, frame in ((query, match.get("size0")), (hit, match.get("size1"))):
        h, w = img.shape[:2]
        f = size / float(w if stacked else h)
        small = cv2.resize(img, (max(1, int(round(w * f))), max(1, int(round(h * f)))), interpolation=cv2.INTER_AREA)
        fw, fh = frame if frame else (w, h)
        scales.append(np.array([small.shape[1] / float(fw), small.shape[0] / float(fh)]))
        panels.append(small)
    gap = 4
    if stacked:
        width = max(p.shape[1] for p in panels)
        canvas = np.full((panels[0].shape[0] + gap + panels[1].shape[0], width, 3), 255, np.uint8)
        canvas[: panels[0].shape[0], : panels[0].shape[1]] = panels[0]
        canvas[panels[0].shape[0] + gap :, : panels[1].shape[1]] = panels[1]
        offset = np.array([0.0, panels[0].shape[0] + gap])
    else:
        canvas = _side_by_side(panels[0], panels[1], gap)
        offset = np.array([panels[0].shape[1] + gap, 0.0])
    p0 = np.asarray(match.get("points0", []), np.float64).reshape(-1, 2)
    p1 = np.asarray(match.get("points1", []), np.float64).reshape(-1, 2)
    for i in _spread(np.arange(min(len(p0), len(p1))), max_lines):
        a = (p0[i] + 0.5) * scales[0] - 0.5
        b = (p1[i] + 0.5) * scales[1] - 0.5 + offset
        pa, pb = (int(round(a[0])), int(round(a[1]))), (int(round(b[0])), int(round(b[1])))
        cv2.line(canvas, pa, pb, INLIER, 1, cv2.LINE_AA)
        cv2.circle(canvas, pa, 2, INLIER, -1, cv2.LINE_AA)
        cv2.circle(canvas, pb, 2, INLIER, -1, cv2.LINE_AA)
    return canvas


def overlay_hits(query: Optional[np.ndarray], images: Sequence[Optional[np.ndarray]], results: Sequence[Mapping[str, Any]]) -> list:
    """``images`` with every verified result that carries a ``match`` replaced by its :func:`hit_overlay`."""
    out = []
    for img, r in zip(images, results):
        m = r.get("match") if r.get("verified") else None
        drawn = hit_overlay(query, img, m) if m else None
        out.append(drawn if drawn is not None else img)
    return out
