"""``cbir duplicates`` (cbir/duplicates.py): pairs from the kNN search, groups, exact copies, keep rules, outputs."""

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from helpers import textured

from cbir.duplicates import choose_keep, components, find_duplicates, near_pairs
from cbir.errors import CbirError


def _flat_search(x):
    def search(v, k, exclude):
        s = v @ x.T
        s[np.arange(len(v)), exclude] = -np.inf
        order = np.argsort(-s, axis=1)[:, :k]
        return np.take_along_axis(s, order, axis=1), order

    return search


def test_near_pairs_keeps_each_pair_once_above_the_threshold_in_chunks():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 16)).astype(np.float32)
    x[10] = x[3] + 0.05 * rng.standard_normal(16)
    x[20] = x[3] + 0.05 * rng.standard_normal(16)
    x[40] = x[7] + 0.05 * rng.standard_normal(16)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j, s = near_pairs(_flat_search(x), lambda r: x[r], len(x), 0.95, k=3, chunk=7, progress=False)
    assert sorted(zip(i.tolist(), j.tolist())) == [(3, 10), (3, 20), (7, 40), (10, 20)]
    assert (i < j).all() and (s >= 0.95).all()
    assert [sorted(c.tolist()) for c in components(len(x), i, j)] == [[3, 10, 20], [7, 40]]


def test_keep_rules():
    names = ["b.jpg", "a.jpg", "c.jpg"]
    facts = [{"width": 100, "height": 100, "bytes": 10, "mtime": 5.0}, {"width": 50, "height": 50, "bytes": 99, "mtime": 9.0},
             {"width": 100, "height": 100, "bytes": 20, "mtime": 1.0}]
    assert names[choose_keep(names, facts, "largest")] == "c.jpg"  # most pixels, then bytes
    assert names[choose_keep(names, facts, "oldest")] == "c.jpg"
    assert names[choose_keep(names, facts, "first")] == "a.jpg"
    with pytest.raises(CbirError, match="--keep"):
        choose_keep(names, facts, "newest")


@pytest.fixture
def folder(tmp_path):
    """3 photos with a half-size copy, a JPEG q70 copy and a byte-identical copy of the first; 3 other photos."""
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for k in range(6):
        img = textured(700 + k, 120, 160)
        Image.fromarray(img).save(d / f"p{k}.png")
        if k < 3:
            Image.fromarray(img[::2, ::2]).save(d / "sub" / f"p{k}_half.png")
            Image.fromarray(img).save(d / f"p{k}_q70.jpg", quality=70)
    (d / "sub" / "p0_same.png").write_bytes((d / "p0.png").read_bytes())
    return d


def _fam(n):
    return os.path.basename(n).split("_")[0].split(".")[0]


def test_folder_groups_copies_and_leaves_the_folder_untouched(folder, tmp_path):
    before = sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    rep = find_duplicates(folder=folder, extractor="colour", threshold=0.9, verify=False, progress=False)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == [b[0] for b in before]
    assert sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
    groups = {_fam(g["images"][0]): sorted(g["images"]) for g in rep["groups"]}
    assert groups == {"p0": ["p0.png", "p0_q70.jpg", "sub/p0_half.png", "sub/p0_same.png"],
                      "p1": ["p1.png", "p1_q70.jpg", "sub/p1_half.png"], "p2": ["p2.png", "p2_q70.jpg", "sub/p2_half.png"]}
    g0 = next(g for g in rep["groups"] if _fam(g["images"][0]) == "p0")
    kept = next(f for f in g0["files"] if f["name"] == g0["keep"])
    assert g0["keep"] == g0["images"][0] and g0["keep"] != "sub/p0_half.png" and kept["width"] == 160  # the largest
    assert kept["bytes"] == max(f["bytes"] for f in g0["files"])  # equal pixels: the most bytes
    assert g0["kind"] == "exact+near" and any(p["exact"] for p in g0["pairs"])
    assert rep["n_redundant"] == 7 and rep["index"] is None
    strict = find_duplicates(folder=folder, extractor="colour", threshold=1.01, verify=False, progress=False)  # no near pair: exact ones only
    assert [sorted(g["images"]) for g in strict["groups"]] == [["p0.png", "sub/p0_same.png"]] and strict["groups"][0]["kind"] == "exact"


def test_cli_json_csv_grid_and_index_mode(folder, tmp_path, capsys):
    from cbir.cli import main

    out = tmp_path / "d.json"
    idx = tmp_path / "idx"
    assert main(["duplicates", str(folder), "--extractor", "colour", "--threshold", "0.9", "--no-verify", "--keep", "first", "--json", str(out),
                 "--csv", str(tmp_path / "d.csv"), "--grid", str(tmp_path / "g.png"), "--index-out", str(idx), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert len(d["groups"]) == 3 and all(g["keep"] == g["images"][0] == sorted(g["images"])[0] for g in d["groups"])
    rows = list(csv.DictReader(open(tmp_path / "d.csv")))
    assert len(rows) == 10 and sum(int(r["keep"]) for r in rows) == 3
    assert (tmp_path / "g.png").stat().st_size > 1000
    assert "3 group(s) of duplicates" in capsys.readouterr().out
    assert main(["duplicates", "--index", str(idx), "--threshold", "0.9", "--no-verify", "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert [g["images"] for g in again["groups"]] == [sorted(g["images"]) for g in d["groups"]] or len(again["groups"]) == 3
    assert again["extractor"] == "colour" and again["index"] == str(idx)
    assert main(["duplicates", "--index", str(idx), "--quiet"]) == 2  # colour has no measured threshold
    assert "no measured duplicate threshold" in capsys.readouterr().err
    assert main(["duplicates", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "nope: not found" in capsys.readouterr().err


def test_verify_rejects_similar_images_that_are_not_the_same_scene(folder):
    rep = find_duplicates(folder=folder, extractor="colour", threshold=0.0, k=3, verify=True, progress=False, min_inliers=15)
    for g in rep["groups"]:
        assert len({_fam(n) for n in g["images"]}) == 1, g["images"]  # everything is a candidate at 0: only copies survive
    assert any(len(g["images"]) >= 3 for g in rep["groups"])
