"""Relative pose from matches and its evaluation, as SuperGlue reports it on ScanNet.

Essential matrix by RANSAC on calibrated points (threshold in pixels divided by the mean focal length), the
cheirality-checked decomposition with most inliers, angular errors of R and t (t up to sign), and the area under the
cumulative error curve (AUC) at 5 / 10 / 20 degrees.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def estimate_relative_pose(
    kpts0, kpts1, K0, K1, threshold: float = 1.0, confidence: float = 0.99999
) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(R, t, inlier mask)`` of image 1 relative to image 0 from pixel matches, or None (fewer than 5 or failure)."""
    import cv2

    k0 = np.asarray(kpts0, np.float64).reshape(-1, 2)
    k1 = np.asarray(kpts1, np.float64).reshape(-1, 2)
    if len(k0) < 5:
        return None
    K0, K1 = np.asarray(K0, np.float64), np.asarray(K1, np.float64)
    f_mean = np.mean([K0[0, 0], K1[1, 1], K0[0, 0], K1[1, 1]])
    n0 = (k0 - K0[[0, 1], [2, 2]][None]) / K0[[0, 1], [0, 1]][None]
    n1 = (k1 - K1[[0, 1], [2, 2]][None]) / K1[[0, 1], [0, 1]][None]
    try:
        E, mask = cv2.findEssentialMat(n0, n1, np.eye(3), threshold=threshold / f_mean, prob=confidence, method=cv2.RANSAC)
    except cv2.error:
        return None
    if E is None or mask is None:
        return None
    best, best_n = None, 0
    for e in np.split(E, len(E) // 3):  # several solutions may come stacked
        n, R, t, _ = cv2.recoverPose(e, n0, n1, np.eye(3), 1e9, mask=mask.copy())
        if n > best_n:
            best_n, best = n, (R, t[:, 0], mask.ravel() > 0)
    return best


def angle_error_rotation(R: np.ndarray, R_gt: np.ndarray) -> float:
    """Angle (degrees) of ``R^T R_gt``."""
    cos = (np.trace(R.T @ R_gt) - 1) / 2
    return float(np.rad2deg(np.abs(np.arccos(np.clip(cos, -1.0, 1.0)))))


def angle_error_translation(t: np.ndarray, t_gt: np.ndarray) -> float:
    """Angle (degrees) between translation directions, up to sign (the essential matrix fixes t up to scale and sign)."""
    n = np.linalg.norm(t) * np.linalg.norm(t_gt)
    if n == 0:
        return 180.0
    err = float(np.rad2deg(np.arccos(np.clip(np.dot(t, t_gt) / n, -1.0, 1.0))))
    return min(err, 180.0 - err)


def pose_errors(T_0to1: np.ndarray, R: Optional[np.ndarray], t: Optional[np.ndarray]) -> Tuple[float, float]:
    """``(rotation error, translation error)`` in degrees; ``inf`` for a failed estimate."""
    if R is None:
        return float("inf"), float("inf")
    T = np.asarray(T_0to1, np.float64)
    return angle_error_rotation(R, T[:3, :3]), angle_error_translation(t, T[:3, 3])


def pose_auc(errors: Sequence[float], thresholds: Sequence[float] = (5, 10, 20)) -> List[float]:
    """Area under the recall-vs-error curve up to each threshold, normalised to [0, 1] (SuperGlue's AUC)."""
    e = np.sort(np.asarray(errors, np.float64))
    n = len(e)
    if n == 0:
        return [0.0 for _ in thresholds]
    recall = np.arange(1, n + 1) / n
    e = np.r_[0.0, e]
    recall = np.r_[0.0, recall]
    out = []
    for th in thresholds:
        last = int(np.searchsorted(e, th))
        x = np.r_[e[:last], th]
        y = np.r_[recall[:last], recall[last - 1]]
        out.append(float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / th))
    return out


def summarize(errors: Sequence[float]) -> Dict[str, float]:
    """AUC@5/10/20 (percent) of max(R, t) errors."""
    a = pose_auc(errors)
    return {"auc@5": 100 * a[0], "auc@10": 100 * a[1], "auc@20": 100 * a[2]}
