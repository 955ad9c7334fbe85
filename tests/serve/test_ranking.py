"""Ranking and label filtering of :class:`cbir.query.Index`, and :meth:`Reranker.rerank_query`, without HTTP: what
the service's search routes are made of."""

import threading

import numpy as np
import pytest
from serve.support import GROUPS, VARIANTS, build, variant, write_gallery

from cbir.query import Index, UnknownLabel

PER_GROUP = len(VARIANTS)


@pytest.fixture(scope="module")
def idx(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranking")
    return Index(build(write_gallery(root / "photos"), root / "index"))


def _brute(idx, vec, exclude=None):
    """(row, cosine) of every gallery row but ``exclude``, best first, from the stored descriptors."""
    x = idx.descriptor_rows(np.arange(len(idx)))
    s = (x @ vec[0]) / (np.linalg.norm(x, axis=1) * np.linalg.norm(vec[0]))
    return [(int(r), float(s[r])) for r in np.argsort(-s, kind="stable") if r != exclude]


def test_label_filter_by_label_and_display_name(idx, monkeypatch):
    assert idx.label_filter(None) is None and idx.label_filter("") is None
    keep = idx.label_filter("group2")
    assert [r for r in range(len(idx)) if keep(r)] == [r for r in range(len(idx)) if idx.labels[r] == "group2"]
    monkeypatch.setitem(idx.manifest, "label_names", {"group2": "Two <b>"})
    keep2 = idx.label_filter("Two <b>")
    assert [r for r in range(len(idx)) if keep2(r)] == [r for r in range(len(idx)) if keep(r)]
    with pytest.raises(UnknownLabel) as e:
        idx.label_filter("nope")
    assert e.value.known == sorted({f"group{g}" for g in range(GROUPS)} | {"group2"}) and "nope" in str(e.value)


def test_ranked_is_the_exact_top_k_without_the_excluded_row(idx):
    row = int(idx.row("img/g1_base.jpg"))
    vec = idx.query_vectors(np.array([row]))
    want = _brute(idx, vec, exclude=row)
    got = idx.ranked(vec, 5, exclude=row, expand=None)
    assert [r for r, _ in got] == [r for r, _ in want[:5]]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want[:5]], atol=1e-5)  # float32 cosines


def test_ranked_with_a_filter_returns_only_and_all_passing_rows(idx):
    row = int(idx.row("img/g1_base.jpg"))
    vec = idx.query_vectors(np.array([row]))
    keep = idx.label_filter("group3")
    got = idx.ranked(vec, 10, keep=keep, exclude=row, expand=None)
    passing = [r for r, _ in _brute(idx, vec, exclude=row) if idx.labels[r] == "group3"]
    assert [r for r, _ in got] == passing and len(passing) == PER_GROUP
    assert idx.ranked(vec, 1, keep=keep, expand=None) == got[:1]


def test_rank_plain_is_ranked(idx):
    vec = idx.query_vectors(np.array([0]))
    r = idx.rank(vec, 4, label="group0", expand=None)
    assert r.inliers is None and r.pairs == idx.ranked(vec, 4, idx.label_filter("group0"), expand=None)


@pytest.fixture(scope="module")
def sift_index(tmp_path_factory):
    from cbir.engine import build_index

    root = tmp_path_factory.mktemp("ranking_sift")
    build_index(write_gallery(root / "photos"), root / "index", extractor="colour", local="sift", progress=False, workers=0,
                log=lambda m: None)
    return Index(root / "index")


def test_rerank_query_answers_inliers_and_verdicts_like_rerank_item(sift_index):
    from cbir.local.rerank import Reranker

    idx = sift_index
    rr = Reranker(idx, "mnn")
    query = rr.query_frame(variant(1, "crop"))
    vec = idx.describe_images([variant(1, "crop")])[1]
    ranking = idx.rank(vec, 4, expand=None, reranker=rr, query=query, top=len(idx))
    assert [idx.labels[r] for r, _ in ranking.pairs[:2]] == ["group1", "group1"]
    floor = int(rr.conf["min_inliers"])
    assert ranking.verified == {i: n >= floor for i, n in ranking.inliers.items()}  # the plain matcher's rule: the floor
    assert ranking.verified[ranking.pairs[0][0]] and not any(ranking.verified[r] for r, _ in ranking.pairs[PER_GROUP:])
    # the stateful call of the CLI and the evaluation gives the same order and counts
    cands = np.array([r for r, _ in idx.ranked(vec, len(idx), expand=None)])
    new = rr.rerank_item(rr.query_views(query), cands, top=len(idx))
    assert [r for r, _ in ranking.pairs] == [int(i) for i in new[:4]] and rr.last_inliers == ranking.inliers


def test_rerank_query_from_many_threads_on_one_reranker(sift_index):
    """No lock around the re-ranker: concurrent queries each get their own answer, as when asked one by one."""
    from cbir.local.rerank import Reranker

    idx = sift_index
    rr = Reranker(idx, "mnn")
    ids = np.arange(len(idx))
    queries = [rr.query_frame(variant(g, "crop")) for g in range(GROUPS)]
    alone = [rr.rerank_query(q, ids, top=len(ids)) for q in queries]
    got = [None] * (2 * GROUPS)
    threads = [threading.Thread(target=lambda k=k: got.__setitem__(k, rr.rerank_query(queries[k % GROUPS], ids, top=len(ids))))
               for k in range(2 * GROUPS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for k, r in enumerate(got):
        a = alone[k % GROUPS]
        assert r is not None and r.ids.tolist() == a.ids.tolist() and r.inliers == a.inliers and r.verified == a.verified
    assert {idx.labels[int(a.ids[0])] for a in alone} == {f"group{g}" for g in range(GROUPS)}  # distinct answers


def test_adopt_extractor_only_the_same_one(idx, sift_index):
    again = Index(idx.folder)
    assert again.adopt_extractor(idx) and again.extractor is idx.extractor
    assert not again.adopt_extractor(idx)  # it has one already
    other = Index(sift_index.folder)
    other.manifest["extractor"] = {**other.manifest["extractor"], "key": "another-conf"}
    fresh = Index(idx.folder)
    assert not fresh.adopt_extractor(other) and fresh._extractor is None
