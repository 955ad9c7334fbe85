"""Drawing of a :func:`cbir.local.pair.match_images` result to a PNG (OpenCV only, no GUI).

Top panel: both images side by side, inlier matches as solid green lines, outliers faint red. Second panel, when
a homography was found (seed 001 §2.3): image 1 warped into image 0's frame, and the two blended where they
overlap, so a correct registration reads as a sharp, ghost-free overlay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

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
    _label(canvas, f"{result.get('features') or ''}+{result.get('matcher', '')}: {int(inl.sum())} inliers / {len(k0)} matches")
    return canvas


def overlap_panel(img0: np.ndarray, img1: np.ndarray, H) -> Optional[np.ndarray]:
    """Image 1 warped into image 0's frame (``H`` maps 0 -> 1), next to the 50/50 blend of the overlap."""
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
    _label(left, "image 1 warped into image 0")
    _label(right, f"overlap blend ({100.0 * valid.mean():.0f}% of image 0)")
    return _side_by_side(left, right)


def draw_matches(img0: np.ndarray, img1: np.ndarray, result: Mapping[str, Any], out_png: os.PathLike) -> str:
    """Write the match figure of ``result`` (from :func:`~cbir.local.pair.match_images`) to ``out_png``; returns the path."""
    import cv2

    from .base import as_rgb8

    img0, img1 = as_rgb8(img0), as_rgb8(img1)
    panels = [matches_panel(img0, img1, result)]
    if result.get("homography") is not None:
        p = overlap_panel(img0, img1, result["homography"])
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
