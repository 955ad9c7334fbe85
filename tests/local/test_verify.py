"""Geometric verification: exact models on synthetic points, and no crash on too few or degenerate matches."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.local.verify import apply_homography, corner_error, verify

H_TRUE = np.array([[0.9, 0.1, 20.0], [-0.05, 1.1, -10.0], [1e-4, 5e-5, 1.0]])


def points(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform([0, 0], [640, 480], size=(n, 2))


@pytest.mark.parametrize("model", ["homography", "affine", "fundamental"])
@pytest.mark.parametrize("n", [0, 1, 3])
def test_too_few_matches_score_zero(model, n):
    p = points(n)
    v = verify(p, p + 1.0, model)
    if model == "affine" and n == 3:
        assert v.score in (0, 3)  # 3 is exactly the minimal sample of an affine map
    else:
        assert v.score == 0 and v.matrix is None
    assert v.inliers.shape == (n,)


@pytest.mark.parametrize("model", ["homography", "affine", "fundamental"])
def test_degenerate_points_do_not_crash(model):
    p = np.stack([np.linspace(0, 100, 20), np.linspace(0, 50, 20)], axis=1)  # collinear
    same = np.tile([[10.0, 10.0]], (20, 1))  # all identical
    for pts in (p, same):
        v = verify(pts, pts, model)
        assert v.inliers.shape == (20,) and v.inliers.dtype == bool
        # whatever OpenCV makes of it, no model from points without spread is trusted
        verdict = v.verdict(pts, (640, 480))
        assert not verdict["verified"] and verdict["reason"], verdict
    nan = p.copy()
    nan[:10] = np.nan
    assert verify(nan, p, model).inliers.shape == (20,)


def test_homography_recovered_with_outliers():
    p0 = points(200)
    p1 = apply_homography(H_TRUE, p0)
    p1[:60] = points(60, seed=1)  # 30 % outliers
    v = verify(p0, p1, "homography")
    assert v.score >= 138 and v.inliers[:60].sum() <= 2
    assert corner_error(v.matrix, H_TRUE, 640, 480) < 0.1
    assert v.to_dict()["n_inliers"] == v.score


@pytest.mark.parametrize("backend", ["opencv", "skimage"])
def test_affine_seed_recipe(backend):
    A = np.array([[0.8, -0.3, 30.0], [0.25, 0.9, -12.0], [0, 0, 1]])
    p0 = points(150)
    p1 = apply_homography(A, p0) + np.random.default_rng(2).normal(0, 1.0, (150, 2))
    p1[:40] += 200.0
    v = verify(p0, p1, "affine", backend=backend)
    assert 100 <= v.score <= 112
    np.testing.assert_allclose(v.matrix[:2, :2], A[:2, :2], atol=0.02)


def test_fundamental_on_two_views():
    rng = np.random.default_rng(3)
    X = np.c_[rng.uniform(-2, 2, 150), rng.uniform(-1.5, 1.5, 150), rng.uniform(4, 9, 150)]
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    ang = np.deg2rad(6)
    R = np.array([[np.cos(ang), 0, np.sin(ang)], [0, 1, 0], [-np.sin(ang), 0, np.cos(ang)]])
    t = np.array([0.5, 0.05, 0.0])
    x0 = (K @ X.T).T
    x1 = (K @ (R @ X.T + t[:, None])).T
    p0, p1 = x0[:, :2] / x0[:, 2:], x1[:, :2] / x1[:, 2:]
    p1[:30] = rng.uniform([0, 0], [640, 480], (30, 2))
    v = verify(p0, p1, "fundamental")
    assert v.score >= 115
    F = v.matrix
    h0, h1 = np.c_[p0, np.ones(150)], np.c_[p1, np.ones(150)]
    err = np.abs(np.sum(h1[30:] * (F @ h0[30:].T).T, axis=1))
    assert np.median(err / np.linalg.norm((F @ h0[30:].T).T[:, :2], axis=1)) < 0.5


def test_unknown_model_and_option():
    with pytest.raises(CbirError, match="unknown verification model"):
        verify(points(10), points(10), "similarity")
    with pytest.raises(CbirError, match="unknown option"):
        verify(points(10), points(10), "homography", treshold=2)


def test_corner_error():
    assert corner_error(None, H_TRUE, 10, 10) == float("inf")
    assert corner_error(H_TRUE, H_TRUE, 800, 640) == 0.0
    shifted = np.array([[1, 0, 3.0], [0, 1, 4.0], [0, 0, 1]]) @ H_TRUE
    assert corner_error(shifted, H_TRUE, 800, 640) == pytest.approx(5.0)


@pytest.mark.parametrize("method", ["accurate", "magsac", "ransac"])
def test_homography_methods_are_deterministic(method):
    p0 = points(120, seed=5)
    p1 = apply_homography(H_TRUE, p0) + np.random.default_rng(6).normal(0, 0.3, (120, 2))
    p1[:30] = points(30, seed=7)
    a = verify(p0, p1, "homography", method=method)
    b = verify(p0, p1, "homography", method=method)
    np.testing.assert_array_equal(a.inliers, b.inliers)
    assert a.score >= 85 and corner_error(a.matrix, H_TRUE, 640, 480) < 2.0
    with pytest.raises(CbirError, match="method must be one of"):
        verify(p0, p1, "homography", method="lmeds2")


def test_relative_pose_and_auc():
    from cbir.local.pose import estimate_relative_pose, pose_auc, pose_errors

    rng = np.random.default_rng(8)
    X = np.c_[rng.uniform(-2, 2, 200), rng.uniform(-1.5, 1.5, 200), rng.uniform(4, 9, 200)]
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    a = np.deg2rad(7)
    R = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    t = np.array([0.4, 0.05, 0.1])
    x0, x1 = (K @ X.T).T, (K @ (R @ X.T + t[:, None])).T
    p0, p1 = x0[:, :2] / x0[:, 2:], x1[:, :2] / x1[:, 2:]
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    R_est, t_est, inl = estimate_relative_pose(p0, p1, K, K)
    e_R, e_t = pose_errors(T, R_est, t_est)
    assert e_R < 1e-3 and e_t < 1e-2 and inl.all()
    noisy = p1 + rng.normal(0, 0.3, (200, 2))
    noisy[:20] = rng.uniform([0, 0], [640, 480], (20, 2))
    R_est, t_est, inl = estimate_relative_pose(p0, noisy, K, K)
    e_R, e_t = pose_errors(T, R_est, t_est)
    assert e_R < 2.0 and e_t < 15.0 and inl[20:].mean() > 0.8 and inl[:20].mean() < 0.3
    assert estimate_relative_pose(p0[:4], p1[:4], K, K) is None
    assert pose_errors(T, None, None) == (float("inf"), float("inf"))
    assert pose_auc([0.0, 0.0]) == pytest.approx([1.0, 1.0, 1.0])
    assert pose_auc([float("inf")] * 3) == [0.0, 0.0, 0.0]
    assert pose_auc([10.0])[2] == pytest.approx(0.75)  # SuperGlue interpolates recall linearly from (0, 0) to (10, 1)
