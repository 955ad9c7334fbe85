"""The graph stage: diffusion (cbir/index/diffusion.py), the stored k-NN graph and its updates (cbir/index/knn.py),
and the stage an index records at build (manifest "graph", knn.h5) as query, eval and the CLI apply it."""

import json

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.index import knn
from cbir.index.diffusion import Diffusion, diffuse, parse
from cbir.index.expansion import neighbours, parse_expand
from helpers import flat_index as flat, unit_rows as unit


def clusters(seed=0, groups=4, per=5, d=8, spread=0.35):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, d))
    x = np.concatenate([c + spread * rng.normal(size=(per, d)) for c in centres])
    return unit(x), np.repeat(np.arange(groups), per)


def test_parse():
    assert parse(None) is None and parse({})["k"] == 20 and parse(True)["alpha"] == 0.99
    assert parse({"k": 5, "alpha": 0.5}) == {**parse({}), "k": 5, "alpha": 0.5}
    for bad in ({"k": 0}, {"alpha": 1.0}, {"alpha": 0}, {"gamma": -1}, {"kq": 2.5}, {"steps": 3}, [1], {"k": 10**9}, {"truncate": "x"}):
        with pytest.raises(CbirError):
            parse(bad)
    assert parse_expand({"diffusion": {"k": 5}})["diffusion"]["k"] == 5
    with pytest.raises(CbirError, match="replaces alpha-QE"):
        parse_expand({"qe_k": 2, "diffusion": {}})
    for bad in ({"dba_k": 10**12}, {"qe_k": "5"}, {"qe_k": -1}):  # what a manifest or a request could claim
        with pytest.raises(CbirError, match="integer from 0 to 1000"):
            parse_expand(bad)


def test_diffusion_solves_the_linear_system():
    """f = (I - alpha S)^-1 y on the mutual k-NN subgraph, checked against a dense solve."""
    x, _ = clusters(1, groups=3, per=4)
    n = len(x)
    sims, ids = neighbours(x, flat(x).search, 4)
    conf = parse({"k": 3, "kq": 4, "alpha": 0.9, "gamma": 3.0, "iters": 200})
    q = unit(x[:1] + 0.05)
    s0 = (x @ q[0])
    order = np.argsort(-s0)
    f = diffuse(order, s0[order], ids, sims, n, conf)
    a = np.zeros((n, n))
    for i in range(n):
        for j, s in zip(ids[i, :3], sims[i, :3]):
            a[i, j] = max(s, 0) ** 3
    w = np.minimum(a, a.T)
    d = w.sum(1)
    dinv = np.where(d > 0, 1 / np.sqrt(np.maximum(d, 1e-300)), 0)
    S = dinv[:, None] * w * dinv[None]
    y = np.zeros(n)
    y[order[:4]] = np.maximum(s0[order[:4]], 0) ** 3
    want = np.linalg.solve(np.eye(n) - 0.9 * S, y)
    np.testing.assert_allclose(f, want[order], rtol=1e-4, atol=1e-7 * np.abs(want).max())


def test_diffusion_leave_one_out_equals_the_gallery_without_the_query():
    x, _ = clusters(2)
    n = len(x)
    conf = parse({"k": 4, "kq": 3, "alpha": 0.8})
    sims, ids = neighbours(x, flat(x).search, 5)
    dif = Diffusion(n, ids, sims, flat(x).search, conf)
    s, got = dif.search(x, n, exclude=np.arange(n))
    for r in range(n):
        keep = np.array([i for i in range(n) if i != r])
        g = x[keep]
        gs, gi = neighbours(g, flat(g).search, 5)
        rs, ri = Diffusion(n - 1, gi, gs, flat(g).search, conf).search(x[r : r + 1], n - 1)
        np.testing.assert_array_equal(got[r, : n - 1], keep[ri[0]])
        np.testing.assert_allclose(s[r, : n - 1], rs[0], rtol=1e-4, atol=1e-6 * max(1e-12, float(np.abs(rs).max())))


def test_diffusion_reaches_what_the_query_does_not_see():
    """A chain 0 - 1 - 2 on the query's side; 3 is closer to the query than 2 but its own neighbours are 4 and 5: diffusion
    follows the mutual neighbours and ranks 2 above 3, the plain search does not."""
    x = unit([[1, 0, 0], [0.8, 0.6, 0], [0.45, 0.89, 0], [0.55, 0, 0.835], [0, 0, 1], [0.3, 0, 0.95]])
    q = unit([[1, 0.05, 0]])
    plain = flat(x).search(q, 6)[1][0].tolist()
    assert plain.index(3) < plain.index(2)
    sims, ids = neighbours(x, flat(x).search, 3)
    _, got = Diffusion(6, ids, sims, flat(x).search, parse({"k": 2, "kq": 1, "alpha": 0.9})).search(q, 6)
    got = got[0].tolist()
    assert set(got[:3]) == {0, 1, 2} and got.index(2) < got.index(3), got


def test_knn_update_equals_a_fresh_graph():
    rng = np.random.default_rng(3)
    x = unit(rng.normal(size=(300, 16)))
    ids = np.arange(300, dtype=np.int64) * 3 + 7  # stable ids, not rows
    k = 6

    def search_of(xs, idl):
        ci = flat(xs)

        def search(v, kk, exclude=None):
            rows = None if exclude is None else np.searchsorted(idl, exclude)
            s, r = ci.search(v, kk, exclude=rows)
            return s, np.where(r >= 0, idl[np.maximum(r, 0)], -1)
        return search

    keep0 = np.arange(250)
    g0 = knn.compute(x[keep0], ids[keep0], search_of(x[keep0], ids[keep0]), k)
    # remove 20 of the first 250, add the last 50
    rm = rng.choice(250, 20, replace=False)
    keep1 = np.concatenate([np.setdiff1d(keep0, rm), np.arange(250, 300)])
    (nbr, sims), counts = knn.update(*g0, ids[keep0], ids[keep1], x[keep1], search_of(x[keep1], ids[keep1]), k)
    fresh = knn.compute(x[keep1], ids[keep1], search_of(x[keep1], ids[keep1]), k)
    np.testing.assert_array_equal(nbr, fresh[0])
    np.testing.assert_allclose(sims, fresh[1], atol=1e-5)
    assert counts["searched"] < len(keep1) and counts["searched"] >= 50  # the added rows and the stale ones only
    sims_r, rows = knn.as_rows(nbr, sims, ids[keep1])
    np.testing.assert_array_equal(ids[keep1][rows], nbr)


def test_build_records_the_default_stage_and_updates_keep_it(small_set, tmp_path):
    from cbir.data import read_file_list
    from cbir.engine import Index, add_images, build_index, compact_index, evaluate, remove_images
    from cbir.index.expansion import DEFAULT_GRAPH

    entries = read_file_list(small_set / "list.txt")
    out = tmp_path / "idx"
    build_index(entries[:8], out, extractor="colour", progress=False)
    idx = Index(out)
    assert idx.manifest["graph"] == parse_expand(DEFAULT_GRAPH)
    assert idx.manifest["knn"] == {"file": "knn.h5", "k": knn.graph_k(DEFAULT_GRAPH)}
    assert (out / "knn.h5").is_file() and "knn.h5" in idx.manifest["files"]
    rep = evaluate(idx, progress=False)
    assert rep["expand"] == idx.manifest["graph"]
    assert evaluate(idx, progress=False, expand=None)["expand"] is None

    add_images(out, entries[8:], progress=False)
    remove_images(out, [entries[0].name, entries[5].name])
    compact_index(out)
    idx = Index(out)
    k = idx.manifest["knn"]["k"]
    stored = idx.stored_knn(k)
    fresh = neighbours(np.asarray(idx.descriptors), idx.search, k)
    np.testing.assert_array_equal(stored[1], fresh[1])
    np.testing.assert_allclose(stored[0], fresh[0], atol=1e-5)
    assert [list(h["graph"]) for h in idx.manifest["history"]] == [["searched", "merged", "seconds"]] * 3
    # the stage that query and eval apply is the recorded one: the same rankings either way
    q = idx.query_images([entries[1].path], top_k=5)[0]["results"]
    q2 = idx.query_images([entries[1].path], top_k=5, expand=idx.manifest["graph"])[0]["results"]
    assert [r["name"] for r in q] == [r["name"] for r in q2]


def test_no_graph_and_hamming_indexes(small_set, tmp_path):
    from cbir.data import read_file_list
    from cbir.engine import Index, build_index

    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "plain", extractor="colour", progress=False, graph=None)
    m = Index(tmp_path / "plain").manifest
    assert m["graph"] is None and m["knn"] is None and not (tmp_path / "plain" / "knn.h5").exists()
    build_index(entries, tmp_path / "ham", extractor="hash", conf={"base": "colour"}, progress=False)
    assert Index(tmp_path / "ham").manifest["graph"] is None  # codes compared by Hamming distance: no graph stage
    from types import SimpleNamespace

    from cbir.build import _graph_spec
    from cbir.index.expansion import DEFAULT_GRAPH

    # class probabilities (semantic) get no stage by default: measured lower with it (README "Graph stage")
    assert _graph_spec("default", SimpleNamespace(name="semantic", binary=False)) is None
    assert _graph_spec("default", SimpleNamespace(name="pooled", binary=False)) == parse_expand(DEFAULT_GRAPH)
    assert _graph_spec({"dba_k": 2}, SimpleNamespace(name="semantic", binary=False))["dba_k"] == 2  # asked for: kept
    with pytest.raises(CbirError, match="needs float descriptors"):
        build_index(entries, tmp_path / "ham2", extractor="hash", conf={"base": "colour"}, progress=False, graph={"dba_k": 2})
    assert not (tmp_path / "ham2").exists()


def test_damaged_knn_file_is_named(small_set, tmp_path):
    from cbir.data import read_file_list
    from cbir.engine import Index, build_index

    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", extractor="colour", progress=False)
    p = tmp_path / "idx" / "knn.h5"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CbirError, match="knn.h5"):
        Index(tmp_path / "idx").query_images([entries[0].path], top_k=3)


def test_cli_graph_options(small_set, tmp_path, capsys):
    from cbir.cli import main

    idx = str(tmp_path / "idx")
    assert main(["index", "build", "--list", str(small_set / "list.txt"), "--extractor", "colour", "--out", idx, "--quiet",
                 "--graph", '{"dba_k": 2, "diffusion": {"k": 3, "kq": 2, "alpha": 0.5}}']) == 0
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["graph"]["diffusion"]["k"] == 3 and m["knn"]["k"] == 4
    capsys.readouterr()
    assert main(["eval", "--index", idx, "--quiet"]) == 0
    assert "graph stage: DBA k=2, alpha=3, diffusion k=3" in capsys.readouterr().out
    assert main(["eval", "--index", idx, "--no-graph", "--quiet"]) == 0
    assert "graph stage: none" in capsys.readouterr().out
    assert main(["eval", "--index", idx, "--graph", '{"qe_k": 1}', "--quiet"]) == 0
    assert "graph stage: alpha-QE k=1" in capsys.readouterr().out
    q = str(small_set / "img" / "g0_0.jpg")
    assert main(["query", q, "--index", idx, "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["graph"]["dba_k"] == 2
    assert main(["eval", "--index", idx, "--graph", "{bad"]) == 2
    assert "--graph: expected index" in capsys.readouterr().err
    assert main(["eval", "--index", idx, "--graph", "none", "--qe-k", "2"]) == 2
    assert "--graph names the whole graph stage" in capsys.readouterr().err
