"""Pair matching API: JSON-able result, drawing, resizing back to the original frame, and graf acceptance."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.local import build_extractor, build_matcher
from cbir.local.pair import match_files, match_images
from cbir.local.verify import corner_error

KEYS = {"features", "matcher", "model", "image_size0", "image_size1", "n_keypoints0", "n_keypoints1", "n_matches", "n_inliers",
        "homography", "model_matrix", "seconds", "mkpts0", "mkpts1", "match_scores", "inliers"}


def test_match_images_result_is_json(warped_pair):
    img0, img1, H = warped_pair
    r = match_images(img0, img1, features="sift", matcher="mnn")
    assert KEYS <= set(r)
    json.dumps(r)
    assert r["n_inliers"] > 50 and r["n_matches"] == len(r["mkpts0"]) == len(r["inliers"])
    assert set(r["seconds"]) == {"extract", "match", "verify", "total"}
    assert corner_error(r["homography"], H, img0.shape[1], img0.shape[0]) < 3.0


def test_shrunk_images_report_original_frame(warped_pair):
    import cv2

    img0, img1, H = warped_pair
    big0 = cv2.resize(img0, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    big1 = cv2.resize(img1, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    S = np.array([[2, 0, 0.5], [0, 2, 0.5], [0, 0, 1.0]])  # pixel-centre-preserving x2
    H2 = S @ H @ np.linalg.inv(S)
    r = match_images(big0, big1, features="sift", matcher="mnn", max_side=img0.shape[1])
    assert r["image_size0"] == [big0.shape[1], big0.shape[0]]
    assert corner_error(r["homography"], H2, big0.shape[1], big0.shape[0]) < 6.0  # 3 px at the working scale


@pytest.mark.parametrize("model", ["affine", "fundamental"])
def test_other_models(warped_pair, model):
    img0, img1, _ = warped_pair
    r = match_images(img0, img1, features="sift", matcher="kdtree", model=model)
    assert r["homography"] is None and r["model_matrix"] is not None and r["n_inliers"] > 20


def test_no_keypoints_is_not_a_crash(textured):
    flat = np.full_like(textured, 127)
    r = match_images(flat, textured, features="sift", matcher="mnn")
    assert r["n_keypoints0"] == 0 and r["n_matches"] == 0 and r["n_inliers"] == 0 and r["homography"] is None


def test_invalid_combination_is_clear(textured):
    with pytest.raises(CbirError, match="xfeat"):
        match_images(textured, textured, features="aliked", matcher="lighterglue")
    with pytest.raises(CbirError, match="built for 'sift'"):
        match_images(textured, textured, features="rootsift", matcher=build_matcher("mnn", features="sift"))


def test_draw_matches(tmp_path, warped_pair):
    import cv2

    from cbir.local.draw import draw_matches

    img0, img1, _ = warped_pair
    r = match_images(img0, img1, features=build_extractor("sift"), matcher="mnn")
    out = draw_matches(img0, img1, r, tmp_path / "sub" / "m.png")
    fig = cv2.imread(out)
    h = img0.shape[0]
    assert fig.shape[0] > 2 * h and fig.shape[1] >= 2 * img0.shape[1]  # match panel + overlap panel
    r["homography"] = None
    fig1 = cv2.imread(draw_matches(img0, img1, r, tmp_path / "m1.png"))
    assert fig1.shape[0] == h


def test_graf_k2_aliked_lightglue(graf, tmp_path):
    r = match_files(graf["dir"] / "img1.png", graf["dir"] / "img2.png", features="aliked", matcher="lightglue", out_png=tmp_path / "g.png")
    assert r["image_size0"] == [800, 640]
    err = corner_error(r["homography"], graf["H"](2), 800, 640)
    assert err < 3.0, f"corner error {err:.2f} px with {r['n_inliers']} inliers"
    assert (tmp_path / "g.png").is_file()
