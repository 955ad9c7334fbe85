"""Matchers: unit behaviour of mnn/kdtree, combination checks, and known homographies recovered on a warped pair."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.local import build_extractor, build_matcher, matcher_names, validate_combination
from cbir.local.base import correspondences, make_features
from cbir.local.verify import corner_error, verify

from helpers import assert_close_scaled


def feats(desc, seed=0):
    desc = np.asarray(desc, np.float32)
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    kp = np.random.default_rng(seed).uniform(0, 100, (len(desc), 2))
    return make_features(kp, desc, np.ones(len(desc)), (100, 100))


def test_registry_lists_every_matcher():
    assert {"mnn", "kdtree", "lightglue", "lighterglue", "superglue", "loftr"} <= set(matcher_names())


def test_mnn_identity_and_mutual():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(50, 32))
    m = build_matcher("mnn", features="sift").match(feats(d), feats(d[::-1].copy()))
    assert len(m["matches"]) == 50
    assert (m["matches"][:, 1] == 49 - m["matches"][:, 0]).all()
    assert m["matches"].dtype == np.int64 and m["scores"].dtype == np.float32
    # cosine of a unit descriptor with itself: 1 up to float32 rounding of a 32-term sum (scale 1)
    assert_close_scaled(m["scores"], np.ones(len(m["scores"])), 1e-5, "mnn scores of identical descriptors", scale=1.0)


def test_mnn_ratio_and_distance_thresholds():
    rng = np.random.default_rng(1)
    d0 = rng.normal(size=(40, 16))
    d1 = d0 + rng.normal(scale=0.05, size=d0.shape)
    d1[:10] = rng.normal(size=(10, 16))  # unrelated: fail the ratio test mostly
    plain = build_matcher("mnn", features="sift").match(feats(d0), feats(d1))
    ratio = build_matcher("mnn", features="sift", ratio_threshold=0.8).match(feats(d0), feats(d1))
    dist = build_matcher("mnn", features="sift", distance_threshold=0.3).match(feats(d0), feats(d1))
    assert len(ratio["matches"]) < len(plain["matches"])
    assert set(map(tuple, dist["matches"])) == {(i, i) for i in range(10, 40)}


def test_mnn_blocks_and_match_many_agree_with_single_pairs():
    rng = np.random.default_rng(2)
    q = feats(rng.normal(size=(120, 24)))
    cands = [feats(rng.normal(size=(n, 24))) for n in (0, 30, 200, 90)]
    cands.append(feats(np.asarray(q["descriptors"])[::2] + 0.01, seed=3))
    full = build_matcher("mnn", features="x")
    small = build_matcher("mnn", features="x", max_elements=2500)  # forces row blocks and small packs
    expected = [full.match(q, c) for c in cands]
    for got in (full.match_many(q, cands), small.match_many(q, cands), [small.match(q, c) for c in cands]):
        for e, g in zip(expected, got):
            np.testing.assert_array_equal(e["matches"], g["matches"])
            np.testing.assert_allclose(e["scores"], g["scores"], rtol=1e-5)


def test_kdtree_seed_semantics():
    rng = np.random.default_rng(4)
    d0 = rng.normal(size=(30, 8))
    d1 = np.concatenate([d0[:20] + rng.normal(scale=0.01, size=(20, 8)), rng.normal(size=(15, 8))])
    m = build_matcher("kdtree", features="delf").match(feats(d0), feats(d1))
    pairs = set(map(tuple, m["matches"]))
    assert {(i, i) for i in range(20)} <= pairs  # (index in image 0, index in image 1)
    assert all(0.0 <= s <= 1.0 for s in m["scores"])
    assert len(pairs) < 35  # far descriptors get no neighbour within 0.8


def test_empty_and_mismatched_features():
    rng = np.random.default_rng(5)
    empty = make_features(np.zeros((0, 2)), np.zeros((0, 16)), np.zeros(0), (10, 10))
    full = feats(rng.normal(size=(5, 16)))
    for name in ("mnn", "kdtree"):
        m = build_matcher(name, features="sift")
        assert m.match(empty, full)["matches"].shape == (0, 2)
        with pytest.raises(CbirError, match="descriptor sizes differ"):
            m.match(full, feats(rng.normal(size=(5, 8))))


@pytest.mark.parametrize(
    "features,matcher,msg",
    [
        ("aliked", "lighterglue", "xfeat"),
        ("xfeat", "lightglue", "aliked"),
        ("sift", "superglue", "superpoint"),
        ("aliked", "loftr", "detector-free"),
        (None, "mnn", "needs local features"),
        ("aliked", "flann", "unknown matcher"),
        ("surf", "mnn", "unknown local feature"),
    ],
)
def test_invalid_combinations(features, matcher, msg):
    with pytest.raises(CbirError, match=msg):
        validate_combination(features, matcher)


def test_valid_combinations():
    for f, m in [("aliked", "lightglue"), ("aliked-n16rot", "lightglue"), ("disk", "lightglue"), ("xfeat", "lighterglue"),
                 ("xfeat", "mnn"), ("sift", "kdtree"), ("superpoint", "superglue"), (None, "loftr")]:
        validate_combination(f, m)


@pytest.mark.parametrize(
    "features,matcher,fconf",
    [
        ("sift", "mnn", {}),
        ("rootsift", "kdtree", {}),
        ("aliked", "lightglue", {"max_keypoints": 1024}),
        ("disk", "lightglue", {"max_keypoints": 1024}),
        ("xfeat", "lighterglue", {"max_keypoints": 1024}),
        ("xfeat", "mnn", {"max_keypoints": 1024}),
    ],
)
def test_warped_pair_recovers_homography(features, matcher, fconf, warped_pair):
    img0, img1, H = warped_pair
    ext = build_extractor(features, **fconf)
    m = build_matcher(matcher, features=features)
    f0, f1 = ext.extract(img0), ext.extract(img1)
    c = correspondences(f0, f1, m.match(f0, f1))
    v = verify(c["keypoints0"], c["keypoints1"], "homography")
    assert v.score >= 40
    h, w = img0.shape[:2]
    assert corner_error(v.matrix, H, w, h) < 3.0


def _pairs(matches):
    return {tuple(r) for r in np.asarray(matches["matches"]).tolist()}


def test_lightglue_match_many_batches_equal_full_width_single_pairs(warped_pair, other_textured):
    """Batched re-ranking runs LightGlue at full depth and width: the same matches as one pair at a time without
    pruning (up to float noise of batched products), and unbatched match_many is exactly match()."""
    img0, img1, _ = warped_pair
    ext = build_extractor("aliked", max_keypoints=512)
    q, c1, c2 = ext.extract(img0), ext.extract(img1), ext.extract(other_textured)
    n = min(len(c1["keypoints"]), len(c2["keypoints"]))
    c1, c2 = ({k: (v if k == "image_size" else v[:n]) for k, v in c.items()} for c in (c1, c2))  # one batch of two
    batched = build_matcher("lightglue", features="aliked").match_many(q, [c1, c2, c1])
    full = build_matcher("lightglue", features="aliked", depth_confidence=-1, width_confidence=-1)
    for got, cand in zip(batched, [c1, c2, c1]):
        want = _pairs(full.match(q, cand))
        assert len(_pairs(got) ^ want) <= max(2, len(want) // 50)
    assert len(batched[0]["matches"]) > 3 * len(batched[1]["matches"])
    one = build_matcher("lightglue", features="aliked", batch=1)
    for got, cand in zip(one.match_many(q, [c1, c2]), [c1, c2]):
        np.testing.assert_array_equal(got["matches"], one.match(q, cand)["matches"])


def test_lightglue_match_many_keeps_order_across_sizes_and_refuses_other_descriptors(warped_pair, other_textured):
    img0, img1, _ = warped_pair
    ext = build_extractor("aliked", max_keypoints=512)
    q, c1, c2 = ext.extract(img0), ext.extract(img1), ext.extract(other_textured)
    small = {k: (v if k == "image_size" else v[:100]) for k, v in c1.items()}
    empty = {k: (v if k == "image_size" else v[:0]) for k, v in c1.items()}
    m = build_matcher("lightglue", features="aliked", batch_mb=1)  # tiny budget: batches of one
    got = m.match_many(q, [c2, small, c1, empty])
    assert len(got) == 4 and len(got[3]["matches"]) == 0
    assert len(got[2]["matches"]) > 3 * len(got[0]["matches"])
    assert np.all(got[1]["matches"][:, 1] < 100)
    bad = dict(c1, descriptors=np.zeros((len(c1["keypoints"]), 64), np.float32))
    with pytest.raises(CbirError, match="descriptor sizes differ"):
        m.match_many(q, [c1, bad])
