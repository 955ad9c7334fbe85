"""Re-ranking scores, the index-level Reranker, HDF5 storage of local features and the `cbir match` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.local import build_extractor, build_matcher
from cbir.local.rerank import Reranker, reorder, rerank_scores
from cbir.local.store import LocalFeatureStore, make_local_extractor, read_local_features, stored_names, write_local_features

from helpers import FakeIndex


def test_rerank_orders_true_match_first(warped_pair, other_textured):
    img0, img1, _ = warped_pair
    ext = build_extractor("rootsift")
    q, pos, neg = ext.extract(img0), ext.extract(img1), ext.extract(other_textured)
    m = build_matcher("mnn", features="rootsift")
    scores = rerank_scores(q, [neg, pos, neg], m)
    assert scores[1] > 50 and scores[1] > 5 * max(scores[0], scores[2])
    assert rerank_scores(q, [neg, pos], m, chunk=1) == scores[:2]
    det = rerank_scores(q, [pos], m, model="affine", details=True)[0]
    assert det["n_inliers"] > 20 and len(det["matrix"]) == 3
    assert rerank_scores(q, [], m) == []


def test_reorder_rules():
    ids = np.array([10, 11, 12, 13, 14, 15])
    # verified (>= 15) first by inliers, ties by global order; unverified keep order; tail untouched
    out = reorder(ids, [3, 40, 20, 40, -1], min_inliers=15)
    assert out.tolist() == [11, 13, 12, 10, 14, 15]


def test_hdf5_roundtrip(tmp_path, textured):
    import h5py

    f = build_extractor("sift", max_keypoints=100).extract(textured)
    path = tmp_path / "local.h5"
    write_local_features(path, "a/b.jpg", f)
    write_local_features(path, "c.jpg", f, half_descriptors=True)
    g = read_local_features(path, "a/b.jpg")
    for k in f:
        np.testing.assert_array_equal(g[k], f[k])
        assert g[k].dtype == f[k].dtype
    assert read_local_features(path, "c.jpg")["descriptors"].dtype == np.float32
    assert sorted(stored_names(path)) == ["a/b.jpg", "c.jpg"]
    with h5py.File(path, "r") as h5:
        assert set(h5["a/b.jpg"]) == {"keypoints", "descriptors", "scores", "image_size"}
    with pytest.raises(CbirError, match="no local features"):
        read_local_features(path, "missing.jpg")
    with pytest.raises(CbirError, match="already stored"):
        write_local_features(path, "c.jpg", f, overwrite=False)


def test_store_and_local_extractor(tmp_path, textured):
    import cv2

    ext = make_local_extractor("sift", {"max_side": 240, "max_keypoints": 300})
    big = cv2.resize(textured, None, fx=1.5, fy=1.5)
    f = ext.extract(big)
    assert f["image_size"].tolist() == [big.shape[1], big.shape[0]]  # the frame of the image given
    assert f["keypoints"][:, 0].max() > 300  # mapped back from the 240-px working copy
    ident = ext.identity()
    assert ident["name"] == "sift" and ident["max_side"] == 240 and ident["conf"]["max_keypoints"] == 300
    assert ext.key() == make_local_extractor("sift", {"max_side": 240, "max_keypoints": 300}).key()
    assert ext.key() != make_local_extractor("sift", {"max_side": 240}).key()
    json.dumps(ident)

    with LocalFeatureStore(tmp_path / "old.h5", mode="a") as s:
        s.put("x/one.png", f)
        s.put("two.png", f)
    with LocalFeatureStore(tmp_path / "new.h5", mode="a") as s:
        assert s.copy_from(tmp_path / "old.h5", ["x/one.png", "absent.png"]) == 1
        assert "x/one.png" in s and "two.png" not in s
        np.testing.assert_array_equal(s.get("x/one.png")["descriptors"], f["descriptors"])
    with pytest.raises(CbirError, match="not found"):
        LocalFeatureStore(tmp_path / "none.h5")


def test_reranker_on_an_index(tmp_path, warped_pair, other_textured):
    import cv2

    from cbir.data import Entry

    img0, img1, _ = warped_pair
    paths = []
    for n, im in (("q.png", img0), ("pos.png", img1), ("neg.png", other_textured)):
        cv2.imwrite(str(tmp_path / n), cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
        paths.append(str(tmp_path / n))
    ext = make_local_extractor("rootsift", {"max_side": 512})
    with LocalFeatureStore(tmp_path / "local.h5", mode="a") as s:
        for n, p in zip(["neg.png", "pos.png", "neg2.png"], [paths[2], paths[1], paths[2]]):
            s.put(n, ext.extract(cv2.cvtColor(cv2.imread(p), cv2.COLOR_BGR2RGB)))
    idx = FakeIndex(tmp_path, ["neg.png", "pos.png", "neg2.png", "nofeat.png"], [paths[2], paths[1], paths[2], paths[2]],
                    {"name": "rootsift", "key": ext.key(), "identity": ext.identity()})
    rr = Reranker(idx, "mnn")
    ids = np.array([0, 2, 3, 1, -1])
    out = rr.rerank(Entry("q.png", Path(paths[0])), ids, None, top=4)  # the query is not stored: extracted
    assert out.tolist() == [1, 0, 2, 3, -1]
    assert rr.last_inliers[1] >= 15 and rr.last_inliers[3] == -1
    assert rr.describe()["features"] == "rootsift"
    assert rr.describe()["max_keypoints"] == 1024  # nearest-neighbour matchers get the larger default
    assert Reranker(idx, "mnn", {"max_keypoints": 64}).describe()["max_keypoints"] == 64
    assert rr.rerank(Entry("q.png", Path(paths[0])), ids, None, top=2).tolist() == ids.tolist()  # pos is beyond top
    rr.close()
    with pytest.raises(CbirError, match="--local"):
        Reranker(FakeIndex(tmp_path, [], [], None), "mnn")
    with pytest.raises(CbirError, match="xfeat"):
        Reranker(idx, "lighterglue")
    xidx = FakeIndex(tmp_path, idx.names, idx.paths, {"name": "xfeat", "identity": {}})
    assert Reranker(xidx, "lighterglue").describe()["max_keypoints"] == 256  # attention: cost grows with its square


def test_cbir_match_command(tmp_path, warped_pair, capsys):
    import cv2

    from cbir.cli.match import cmd_match, parse_options, register

    img0, img1, _ = warped_pair
    p0, p1 = tmp_path / "a.png", tmp_path / "b.png"
    cv2.imwrite(str(p0), cv2.cvtColor(img0, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(p1), cv2.cvtColor(img1, cv2.COLOR_RGB2BGR))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(), lambda p: None)
    a = parser.parse_args(["match", str(p0), str(p1), "--features", "sift", "--matcher", "mnn", "--json", "--out", str(tmp_path / "m.png"),
                           "--matcher-conf", "ratio_threshold=0.8"])
    assert a.func(a) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_inliers"] > 30 and len(r["homography"]) == 3 and "mkpts0" not in r and (tmp_path / "m.png").is_file()
    a = parser.parse_args(["match", str(p0), str(p1), "--features", "sift", "--recipe", "delf"])
    assert cmd_match(a) == 0
    assert "kdtree, affine" in capsys.readouterr().out
    assert parse_options(["a=1", "b=x", "c=null", "d=[1,2]"], "t") == {"a": 1, "b": "x", "c": None, "d": [1, 2]}
    with pytest.raises(CbirError):
        parse_options(["oops"], "t")


def test_reranker_rotations_find_a_turned_copy(tmp_path, textured, other_textured):
    """XFeat + LighterGlue are not rotation invariant: a copy turned by 90 degrees verifies only when the query is
    also matched turned (``rotations``), and then as the best of the views."""
    import cv2

    from cbir.data import Entry

    turned = np.ascontiguousarray(np.rot90(textured, k=1))
    paths = {}
    for n, im in (("q.png", textured), ("turned.png", turned), ("neg.png", other_textured)):
        paths[n] = str(tmp_path / n)
        cv2.imwrite(paths[n], cv2.cvtColor(im, cv2.COLOR_RGB2BGR))
    ext = make_local_extractor("xfeat", {"max_side": 512})
    with LocalFeatureStore(tmp_path / "local.h5", mode="a") as s:
        for n in ("turned.png", "neg.png"):
            s.put(n, ext.extract(cv2.cvtColor(cv2.imread(paths[n]), cv2.COLOR_BGR2RGB)))
    idx = FakeIndex(tmp_path, ["neg.png", "turned.png"], [paths["neg.png"], paths["turned.png"]],
                    {"name": "xfeat", "key": ext.key(), "identity": ext.identity()})
    query = Entry("q.png", Path(paths["q.png"]))
    upright = Reranker(idx, "lighterglue")
    upright.rerank(query, np.array([0, 1]))
    both = Reranker(idx, "lighterglue", {"rotations": [0, 90]})
    assert both.rerank(query, np.array([0, 1])).tolist() == [1, 0]
    assert both.last_inliers[1] >= 100 and both.last_inliers[1] > 3 * max(upright.last_inliers[1], 1)
    assert both.last_inliers[0] < 15 and both.describe()["rotations"] == [0, 90]
    with pytest.raises(CbirError, match="multiples of 90"):
        Reranker(idx, "lighterglue", {"rotations": [0, 45]})
