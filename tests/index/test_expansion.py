"""alpha-QE and DBA (cbir/index/expansion.py): the math on hand-computed cases, shapes, leave-one-out."""

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.index.expansion import Expander, alpha_qe, dba, neighbours, parse_expand
from helpers import flat_index as flat, unit_rows


def unit(*rows):
    return unit_rows(rows)


def test_alpha_qe_by_hand():
    q = unit([1, 0])
    nb = unit([0.6, 0.8], [0, 1])[None]  # sims 0.6 and 0
    got = alpha_qe(q, nb, np.array([[0.6, 0.0]]), alpha=2.0)
    want = np.array([1 + 0.36 * 0.6, 0.36 * 0.8])  # q + 0.6^2 x1 + 0^2 x2
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), atol=1e-6)
    # a negative similarity weighs 0; an invalid neighbour (id -1) too
    np.testing.assert_allclose(alpha_qe(q, nb, np.array([[-0.6, 0.9]]), 1.0, valid=np.array([[True, False]])), q, atol=1e-6)


def test_dba_by_hand():
    x = unit([1, 0], [0.8, 0.6], [0, 1])
    sims, ids = neighbours(x, flat(x).search, 1)
    assert ids[:, 0].tolist() == [1, 0, 1] and np.allclose(sims[:, 0], [0.8, 0.8, 0.6])
    got = dba(x, ids, sims, alpha=1.0)
    want = np.stack([x[0] + 0.8 * x[1], x[1] + 0.8 * x[0], x[2] + 0.6 * x[1]])
    np.testing.assert_allclose(got, want / np.linalg.norm(want, axis=1, keepdims=True), atol=1e-6)


def test_parse_expand():
    assert parse_expand(None) is None and parse_expand({"qe_k": 0, "dba_k": 0}) is None
    assert parse_expand({"qe_k": 2}) == {"qe_k": 2, "dba_k": 0, "alpha": 3.0}
    for bad in ({"qe_k": -1}, {"qe_k": 1, "alpha": -2}, {"k": 3}, {"dba_k": 1.5}):
        with pytest.raises(CbirError):
            parse_expand(bad)


@pytest.mark.parametrize("qe_k,dba_k", [(3, 0), (0, 3), (2, 2), (100, 100)])
def test_shapes_and_k_larger_than_gallery(qe_k, dba_k):
    rng = np.random.default_rng(0)
    x = unit(*rng.normal(size=(12, 5)))
    e = Expander(x, flat(x).search, qe_k=qe_k, dba_k=dba_k)
    s, ids = e.search(x[:4], 50)
    assert s.shape == ids.shape == (4, 12)
    assert all(sorted(r.tolist()) == list(range(12)) for r in ids)  # every gallery row once
    assert (np.diff(s, axis=1) <= 1e-6).all()
    s, ids = e.search(x[:4], 50, exclude=np.arange(4))
    assert (ids[:, -1] == -1).all() and all(r not in ids[r] for r in range(4))


@pytest.mark.parametrize("qe_k,dba_k", [(2, 0), (0, 2), (2, 3)])
def test_leave_one_out_equals_the_gallery_without_the_query(qe_k, dba_k):
    """Gallery row r as a query sees exactly what it would if r had never been in the gallery (no leak)."""
    rng = np.random.default_rng(1)
    x = unit(*rng.normal(size=(15, 4)))
    e = Expander(x, flat(x).search, qe_k=qe_k, alpha=3.0, dba_k=dba_k)
    s, ids = e.search(x, 15, exclude=np.arange(15))
    for r in range(15):
        keep = np.array([i for i in range(15) if i != r])
        g = x[keep]
        ref = Expander(g, flat(g).search, qe_k=qe_k, alpha=3.0, dba_k=dba_k)
        rs, ri = ref.search(x[r : r + 1], 14)
        np.testing.assert_array_equal(ids[r, :14], keep[ri[0]])
        np.testing.assert_allclose(s[r, :14], rs[0], atol=1e-5)


def test_query_expansion_searches_again_with_the_expanded_query():
    x = unit([1, 0.0, 0], [0.99, 0.14, 0], [0.5, 0.8, 0.3], [0, 0, 1])
    q = unit([0.9, 0.4, 0.1])
    plain = flat(x).search(q, 4)
    s, ids = Expander(x, flat(x).search, qe_k=1, alpha=1.0).search(q, 4)
    nb = plain[1][0, 0]
    expanded = alpha_qe(q, x[[nb]][None], plain[0][:, :1], 1.0)
    np.testing.assert_allclose(s[0], np.sort(x @ expanded[0])[::-1], atol=1e-6)


def test_engine_and_cli_hooks(small_set, tmp_path, capsys):
    from cbir.cli import main
    from cbir.data import read_file_list
    from cbir.engine import Index, build_index, evaluate

    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", extractor="colour", progress=False)
    idx = Index(tmp_path / "idx")
    rep = evaluate(idx, progress=False, expand={"qe_k": 2, "dba_k": 2})
    assert rep["expand"] == {"qe_k": 2, "alpha": 3.0, "dba_k": 2} and rep["leave_one_out"]
    assert evaluate(idx, progress=False)["expand"] == idx.manifest["graph"]  # the stage the index records (test_graph.py)
    assert evaluate(idx, progress=False, expand=None)["expand"] is None
    res = idx.query_images([entries[0].path], top_k=3, expand={"qe_k": 1})
    assert len(res[0]["results"]) == 3
    assert main(["eval", "--index", str(tmp_path / "idx"), "--qe-k", "2", "--dba-k", "1", "--quiet"]) == 0
    assert "graph stage: alpha-QE k=2, DBA k=1" in capsys.readouterr().out
    assert main(["query", str(entries[0].path), "--index", str(tmp_path / "idx"), "--expand", "--json"]) == 0

    build_index(entries, tmp_path / "ham", extractor="hash", conf={"base": "colour"}, progress=False)
    with pytest.raises(CbirError, match="cosine index"):
        evaluate(tmp_path / "ham", progress=False, expand={"qe_k": 2})


@pytest.mark.parametrize("qe_k,dba_k", [(0, 3), (2, 3), (3, 2)])
def test_shortlist_mode_equals_the_exact_scan_when_it_covers_the_gallery(qe_k, dba_k):
    """Large galleries re-score a shortlist of the plain search against augmented vectors made on the fly; with the
    shortlist as large as the gallery it is the exact scan, leave-one-out included."""
    rng = np.random.default_rng(4)
    x = unit(*rng.normal(size=(40, 6)))
    exact = Expander(x, flat(x).search, qe_k=qe_k, dba_k=dba_k, shortlist=0)
    short = Expander(x, flat(x).search, qe_k=qe_k, dba_k=dba_k, shortlist=40)
    assert exact.gallery is not None and short.gallery is None
    for ex in (None, np.arange(40)):
        s1, i1 = exact.search(x, 40, exclude=ex)
        s2, i2 = short.search(x, 40, exclude=ex)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_allclose(s1, s2, atol=1e-5)
    # a shortlist shorter than the gallery: its head is re-scored, the rest follows in plain order (every row once)
    s3, i3 = Expander(x, flat(x).search, qe_k=qe_k, dba_k=dba_k, shortlist=10).search(x[:3], 40)
    assert all(sorted(r.tolist()) == list(range(40)) for r in i3)
    assert (np.diff(s3, axis=1) <= 1e-6).all()
