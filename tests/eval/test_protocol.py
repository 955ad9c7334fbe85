"""The Oxford/Paris protocols (cbir/eval/protocol.py): the scores on hand-computed cases, the ground-truth readers,
and `cbir eval --gnd` on a small index whose answers can be recomputed from its own JSON."""

import json

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.eval.protocol import (compute_ap, compute_map, plain_ap, read_classic, read_revisited, revisited_setup, stem)


def test_compute_ap_and_map_by_hand():
    # ranking: p n p j p n (gallery ids 0..5), positives {0, 2, 4}, junk {3}
    ranks = np.array([[0, 1, 2, 3, 4, 5]]).T
    gnd = [{"ok": np.array([0, 2, 4]), "junk": np.array([3])}]
    # positives at 0-based ranks 0, 2, 3 once the junk is taken out; trapezoids of (j/r + (j+1)/(r+1)) / 2 per positive
    want = (1 + 1) / 2 / 3 + (1 / 2 + 2 / 3) / 2 / 3 + (2 / 3 + 3 / 4) / 2 / 3
    assert want == pytest.approx(55 / 72)
    res = compute_map(ranks, gnd, kappas=(1, 5, 10))
    assert res["map"] == pytest.approx(want) and res["aps"][0] == pytest.approx(want)
    # mP@k as revisitop defines it: precision at min(k, rank of the last positive): 1/1, 3/4, 3/4
    np.testing.assert_allclose(res["mp"], [1.0, 0.75, 0.75])
    # cbir's AP of the same ranking: precision 1, 2/3, 3/4 at the positives among non-junk results
    assert plain_ap(["a", "b", "c", "j", "d", "e"], {"a", "c", "d"}, {"j"}, 3) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    # a positive missing from the ranking still counts in nres
    assert compute_ap(np.array([0]), 2) == pytest.approx(0.5)


def test_compute_map_skips_queries_without_positives():
    ranks = np.array([[0, 1], [1, 0]])
    res = compute_map(ranks, [{"ok": np.array([0]), "junk": np.array([])}, {"ok": np.array([], np.int64)}], kappas=(1,))
    assert res["n_empty"] == 1 and np.isnan(res["aps"][1]) and res["map"] == pytest.approx(1.0)


def test_revisited_setups():
    g = [{"easy": [1], "hard": [2], "junk": [3]}]
    e, m, h = (revisited_setup(g, s)[0] for s in ("easy", "medium", "hard"))
    assert e["ok"].tolist() == [1] and sorted(e["junk"].tolist()) == [2, 3]
    assert sorted(m["ok"].tolist()) == [1, 2] and m["junk"].tolist() == [3]
    assert h["ok"].tolist() == [2] and sorted(h["junk"].tolist()) == [1, 3]
    with pytest.raises(CbirError, match="unknown setup"):
        revisited_setup(g, "extreme")


def _write_gt(folder, name, query, box, good=(), ok=(), junk=()):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}_query.txt").write_text(f"{query} " + " ".join(f"{v:.6f}" for v in box) + "\n")
    for kind, names in (("good", good), ("ok", ok), ("junk", junk)):
        (folder / f"{name}_{kind}.txt").write_text("".join(n + "\n" for n in names))


def test_read_classic_and_errors(tmp_path):
    gt = tmp_path / "gt"
    _write_gt(gt, "tower_1", "img_a", (1, 2, 30, 40), good=["img_a"], ok=["img_b"], junk=["img_c", "img_b"])
    q = read_classic(gt)[0]
    assert q["gnd"] == "tower_1" and q["query"] == "img_a" and q["box"] == [1, 2, 30, 40]
    assert q["pos"] == {"img_a", "img_b"} and q["junk"] == {"img_c"}  # a positive listed as junk too stays positive
    (gt / "tower_1_ok.txt").unlink()
    with pytest.raises(CbirError, match="tower_1_ok.txt: ground-truth file not found"):
        read_classic(gt)
    (gt / "tower_1_query.txt").write_text("img_a 1 2\n")
    with pytest.raises(CbirError, match="expected 'image x1 y1 x2 y2'"):
        read_classic(gt)
    with pytest.raises(CbirError, match="not a folder"):
        read_classic(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CbirError, match="no NAME_query.txt"):
        read_classic(tmp_path / "empty")


def test_read_revisited_checks_indices(tmp_path):
    p = tmp_path / "gnd.json"
    p.write_text(json.dumps({"imlist": ["a", "b.jpg"], "qimlist": ["q"], "gnd": [{"bbx": [0, 0, 5, 5], "easy": [0], "hard": [], "junk": [1]}]}))
    d = read_revisited(p)
    assert d["imlist"] == ["a", "b"] and d["qimlist"] == ["q"]
    p.write_text(json.dumps({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [3]}]}))
    with pytest.raises(CbirError, match=r"gnd\[0\].easy must list indices"):
        read_revisited(p)
    p.write_text("{not json")
    with pytest.raises(CbirError, match="not a readable JSON"):
        read_revisited(p)


def test_stem():
    assert stem("images/defense/paris_defense_000605.jpg") == "paris_defense_000605" and stem("abc") == "abc"


@pytest.fixture
def protocol_set(small_set, tmp_path):
    """A colour index of the small set and a classic gt folder: two queries in the gallery, one that is not."""
    from cbir.data import read_file_list
    from cbir.engine import build_index

    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", extractor="colour", progress=False, graph=None)
    names = [stem(e.name) for e in entries]
    gt = tmp_path / "gt"
    _write_gt(gt, "first_1", names[0], (0, 0, 40, 30), good=[names[0], names[1]], ok=[names[2], "not_in_gallery"], junk=[names[3]])
    _write_gt(gt, "second_1", names[4], (5, 5, 60, 50), good=[names[4]], ok=[names[5]], junk=[])
    _write_gt(gt, "absent_1", "not_in_gallery", (0, 0, 10, 10), good=[names[0]])
    return tmp_path / "idx", gt, names


def test_evaluate_gnd_json_agrees_with_its_rankings(protocol_set, tmp_path):
    from cbir.eval.protocol import evaluate_gnd

    idx, gt, names = protocol_set
    rep = evaluate_gnd(idx, gt, progress=False)
    assert rep["n_queries"] == 2 and rep["n_queries_skipped"] == 1 and rep["queries_skipped"][0]["gnd"] == "absent_1"
    gts = {q["gnd"]: q for q in read_classic(gt)}
    aps = []
    for q in rep["queries"]:
        ranking = [stem(n) for n in q["ranking"]]
        assert sorted(ranking) == sorted(names)  # the whole gallery, junk included
        g = gts[q["gnd"]]
        n_pos = len(g["pos"] & set(names))
        assert q["n_positives"] == n_pos
        assert q["ap"] == pytest.approx(plain_ap(ranking, g["pos"], g["junk"], n_pos), abs=1e-12)
        aps.append(q["ap"])
    assert rep["metrics"]["map"] == pytest.approx(np.mean(aps), abs=1e-12)
    assert 0 < rep["metrics"]["map_trapezoid"] <= 1 and rep["expand"] is None


def test_evaluate_gnd_crops_the_query_to_its_box(protocol_set, tmp_path):
    """The query is its image cropped to the box: a box around a different part changes the descriptor, hence the scores."""
    from cbir.eval.protocol import query_crop
    from cbir.engine import Index

    idx_dir, gt, names = protocol_set
    idx = Index(idx_dir)
    p = idx.paths[0]
    full = query_crop(p, None, None)
    crop = query_crop(p, (0, 0, 40, 30), None)
    assert crop.shape[:2] == (30, 40) and full.shape[:2] != crop.shape[:2]
    np.testing.assert_array_equal(crop, full[:30, :40])
    # boxes beyond the image are clipped to it, never empty
    assert query_crop(p, (-5, -5, 1e6, 1e6), None).shape == full.shape
    assert query_crop(p, (10, 10, 10, 10), None).shape[:2] == (1, 1)


def test_cli_eval_gnd(protocol_set, tmp_path, capsys):
    from cbir.cli import main

    idx, gt, _ = protocol_set
    out = tmp_path / "r.json"
    assert main(["eval", "--index", str(idx), "--gnd", str(gt), "--json", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "2 queries, 1 skipped" in text and "mAP" in text
    rep = json.loads(out.read_text())
    assert rep["n_queries"] == 2 and {"gnd", "query", "ap", "ranking"} <= set(rep["queries"][0])
    assert main(["eval", "--index", str(idx), "--gnd", str(tmp_path / "nope")]) == 2
    assert "not a folder of Oxford/Paris ground-truth files" in capsys.readouterr().err
