"""Metrics against rankings computed by hand."""

import numpy as np
import pytest

from cbir.eval.metrics import (
    MetricAccumulator,
    ap_at_k,
    average_precision,
    ns_score,
    pr_curve,
    precision_at_k,
    seed_scores,
)

# one query, ranking: R N R N N R (R = relevant), 4 relevant items in the gallery (one never retrieved)
REL = np.array([[1, 0, 1, 0, 0, 1]], bool)
NREL = [4]


def test_precision_at_k_by_hand():
    assert precision_at_k(REL, 1)[0] == 1.0
    assert precision_at_k(REL, 2)[0] == 0.5
    assert precision_at_k(REL, 5)[0] == pytest.approx(2 / 5)
    # fewer results than k: the missing ranks count as misses
    assert precision_at_k(REL, 10)[0] == pytest.approx(3 / 10)


def test_ap_at_k_by_hand():
    # hits at ranks 1, 3, 6 -> precision 1/1, 2/3, 3/6
    assert ap_at_k(REL, NREL, 1)[0] == pytest.approx(1.0 / 1)
    assert ap_at_k(REL, NREL, 5)[0] == pytest.approx((1 + 2 / 3) / 4)  # min(5, 4) = 4
    assert ap_at_k(REL, NREL, 3)[0] == pytest.approx((1 + 2 / 3) / 3)  # min(3, 4) = 3


def test_full_ap_divides_by_all_relevant():
    assert average_precision(REL, NREL)[0] == pytest.approx((1 + 2 / 3 + 3 / 6) / 4)
    # a perfect ranking of 3 relevant items has AP 1
    assert average_precision([[1, 1, 1, 0]], [3])[0] == pytest.approx(1.0)


def test_query_without_relevant_items_is_nan_and_left_out():
    acc = MetricAccumulator(ks=(1,))
    acc.update(np.array([[1, 0], [0, 0]], bool), np.array([1, 0]))
    s = acc.summary()
    assert np.isnan(average_precision([[0, 0]], [0])[0])
    assert s["map"] == pytest.approx(1.0)
    assert s["precision@1"] == pytest.approx(1.0)


def test_ns_score_counts_the_query_in_leave_one_out():
    rel = np.array([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    assert ns_score(rel, self_in_gallery=True).tolist() == [3.0, 1.0, 4.0]
    assert ns_score(rel, self_in_gallery=False).tolist() == [3.0, 0.0, 4.0]


def test_seed_definition_differs_from_precision_at_1():
    # query 0: first result relevant, second not; query 1: first not, second relevant
    rel = np.array([[1, 0, 1, 1, 1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0, 0, 0]], bool)
    seed = seed_scores(rel)
    assert precision_at_k(rel, 1).mean() == 0.5
    assert seed["seed_mAP@1"] == 0.5  # reads column 1
    rel2 = np.array([[1, 0] + [0] * 8, [1, 0] + [0] * 8], bool)
    assert precision_at_k(rel2, 1).mean() == 1.0
    assert seed_scores(rel2)["seed_mAP@1"] == 0.0  # the seed's bug: the second result
    # its @5 and @10 are mean precision@5 / @10
    assert seed["seed_mAP@5"] == pytest.approx(precision_at_k(rel, 5).mean())
    assert seed["seed_mAP@10"] == pytest.approx(precision_at_k(rel, 10).mean())


def test_pr_curve_interpolated():
    pr = pr_curve(REL, NREL)[0]
    # recall reaches 0.25 at rank 1 (P=1), 0.5 at rank 3 (P=2/3), 0.75 at rank 6 (P=0.5), never 1.0
    assert pr[0] == pytest.approx(1.0)
    assert pr[2] == pytest.approx(1.0)  # r=0.2 -> first reached at rank 1
    assert pr[5] == pytest.approx(2 / 3)  # r=0.5
    assert pr[7] == pytest.approx(0.5)  # r=0.7
    assert pr[10] == 0.0  # recall 1 never reached


def test_accumulator_chunks_equal_one_pass():
    rng = np.random.default_rng(0)
    rel = rng.random((50, 30)) < 0.3
    n_rel = rel.sum(1) + rng.integers(0, 3, 50)
    one = MetricAccumulator(ks=(1, 5, 10), with_ns=True)
    one.update(rel, n_rel)
    many = MetricAccumulator(ks=(1, 5, 10), with_ns=True)
    for a in range(0, 50, 7):
        many.update(rel[a : a + 7], n_rel[a : a + 7])
    s1, s2 = one.summary(), many.summary()
    for k in s1:
        assert s1[k] == pytest.approx(s2[k])
    np.testing.assert_allclose(one.pr(), many.pr())


def test_summary_is_none_not_nan_when_no_query_has_a_relevant_item():
    import json

    acc = MetricAccumulator(ks=(1, 5), with_ns=True)
    acc.update(np.array([[0, 0], [0, 0]], bool), np.array([0, 0]))
    s = acc.summary()
    assert set(s) == {"precision@1", "precision@5", "ap@1", "ap@5", "map", "ns_score"}
    assert all(v is None for v in s.values())
    json.dumps(s, allow_nan=False)
    assert (acc.n_queries(), acc.n_evaluated()) == (2, 0)
    empty = MetricAccumulator(ks=(1,))
    assert empty.summary() == {"precision@1": None, "ap@1": None, "map": None}
    assert seed_scores(np.zeros((0, 10), bool)) == {"seed_mAP@1": None, "seed_mAP@5": None, "seed_mAP@10": None}


def test_finite_or_none_and_bad_cutoffs():
    from cbir.eval.metrics import finite_or_none

    assert finite_or_none(float("nan")) is None and finite_or_none(np.inf) is None and finite_or_none(None) is None
    assert finite_or_none(np.float32(0.5)) == 0.5
    with pytest.raises(ValueError, match="positive"):
        MetricAccumulator(ks=(0, 5))
