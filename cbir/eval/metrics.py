"""Retrieval metrics on relevance matrices.

``rel`` is a boolean matrix ``(Q, K)``: ``rel[q, i]`` says whether the result at rank ``i + 1`` of query
``q`` is relevant. ``n_rel[q]`` is the number of relevant gallery items of query ``q`` in the whole
gallery (not only in the top ``K``; the query itself excluded in leave-one-out).

Definitions (see README, "Metrics"):

* precision@k = relevant results in the top k / k.
* AP@k = sum over relevant results at ranks i <= k of precision@i, divided by min(k, n_rel).
* AP (full) = the same sum over the whole ranking, divided by n_rel; mAP is its mean over the queries
  that have at least one relevant item.
* N-S score (UKBench): relevant results among the top 4, the query itself counted, at most 4.

The seed (003) prints "mAP@k" but computes mean precision@k, and reads its "mAP@1" from the second
result. :func:`seed_scores` reproduces it so the difference can be shown; cbir never reports it as mAP.
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np


def _as_rel(rel) -> np.ndarray:
    rel = np.asarray(rel, dtype=bool)
    if rel.ndim == 1:
        rel = rel[None]
    return rel


def _pad(rel: np.ndarray, k: int) -> np.ndarray:
    if rel.shape[1] >= k:
        return rel[:, :k]
    return np.concatenate([rel, np.zeros((rel.shape[0], k - rel.shape[1]), bool)], axis=1)


def precision_at_k(rel, k: int) -> np.ndarray:
    """Per-query precision@k; missing ranks (fewer than k results) count as not relevant."""
    rel = _pad(_as_rel(rel), k)
    return rel.sum(1) / float(k)


def _precision_curve(rel: np.ndarray) -> np.ndarray:
    return np.cumsum(rel, axis=1) / np.arange(1, rel.shape[1] + 1)


def ap_at_k(rel, n_rel, k: int) -> np.ndarray:
    """Per-query AP@k = sum_{i<=k, rel_i} precision@i / min(k, n_rel); NaN where n_rel == 0."""
    rel = _pad(_as_rel(rel), k)
    n_rel = np.asarray(n_rel, dtype=np.float64).reshape(-1)
    s = (_precision_curve(rel) * rel).sum(1)
    den = np.minimum(k, n_rel)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, s / np.maximum(den, 1), np.nan)


def average_precision(rel, n_rel) -> np.ndarray:
    """Per-query AP over the given ranking, divided by n_rel (relevant items ranked beyond K add 0)."""
    rel = _as_rel(rel)
    n_rel = np.asarray(n_rel, dtype=np.float64).reshape(-1)
    s = (_precision_curve(rel) * rel).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_rel > 0, s / np.maximum(n_rel, 1), np.nan)


def ns_score(rel, self_in_gallery: bool = True) -> np.ndarray:
    """Per-query UKBench N-S score: relevant results in the top 4, the query itself counted (max 4).

    With ``self_in_gallery`` (leave-one-out: the query was removed from its own ranking) the query
    counts as the first hit and the top 3 remaining results are read; otherwise the top 4.
    """
    rel = _pad(_as_rel(rel), 4)
    if self_in_gallery:
        return 1.0 + rel[:, :3].sum(1)
    return rel[:, :4].sum(1).astype(np.float64)


def recall_levels(n: int = 11) -> np.ndarray:
    return np.linspace(0.0, 1.0, n)


def pr_curve(rel, n_rel, levels: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-query interpolated precision at recall ``levels`` (precision_interp(r) = max precision at recall >= r).

    Returns ``(Q, len(levels))``; rows of queries without relevant items are NaN.
    """
    rel = _as_rel(rel)
    levels = recall_levels() if levels is None else np.asarray(levels)
    n_rel = np.asarray(n_rel, dtype=np.float64).reshape(-1)
    prec = _precision_curve(rel)
    rec = np.cumsum(rel, axis=1) / np.maximum(n_rel, 1)[:, None]
    # interpolated precision: running max from the right
    interp = np.maximum.accumulate(prec[:, ::-1], axis=1)[:, ::-1]
    out = np.zeros((rel.shape[0], len(levels)))
    for j, r in enumerate(levels):
        reached = rec >= r - 1e-12
        first = np.where(reached.any(1), reached.argmax(1), -1)
        vals = interp[np.arange(rel.shape[0]), np.maximum(first, 0)]
        out[:, j] = np.where(first >= 0, vals, 0.0)
    out[n_rel == 0] = np.nan
    return out


def finite_or_none(x) -> Optional[float]:
    """``float(x)``, or None where it is NaN / infinite (an undefined mean): JSON has no NaN, reports write null."""
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


def seed_scores(rel) -> Dict[str, Optional[float]]:
    """The numbers seed 003 prints as "mAP@1/5/10", for comparison only.

    Its "mAP@5" and "mAP@10" are mean precision@5 and @10; its "mAP@1" reads column 1, the
    relevance of the *second* result. cbir reports these as precision@k (with @1 read correctly).
    None for each when there is no query.
    """
    rel = _pad(_as_rel(rel), 10).astype(np.float64)
    if rel.shape[0] == 0:
        return {"seed_mAP@1": None, "seed_mAP@5": None, "seed_mAP@10": None}
    return {
        "seed_mAP@1": float(rel[:, 1].mean()),
        "seed_mAP@5": float(rel[:, :5].mean(1).mean()),
        "seed_mAP@10": float(rel[:, :10].mean(1).mean()),
    }


class MetricAccumulator:
    """Accumulates per-query metrics chunk by chunk, so no (Q, N) matrix is ever held whole."""

    def __init__(self, ks: Iterable[int] = (1, 5, 10), with_ns: bool = False, self_in_gallery: bool = True) -> None:
        self.ks = sorted(set(int(k) for k in ks))
        if not self.ks or self.ks[0] < 1:
            raise ValueError(f"cut-offs k must be positive integers, got {list(ks)}")
        self.with_ns = with_ns
        self.self_in_gallery = self_in_gallery
        self.parts: Dict[str, list] = {}

    def _add(self, key: str, values: np.ndarray) -> None:
        self.parts.setdefault(key, []).append(np.asarray(values, dtype=np.float64))

    def update(self, rel, n_rel) -> None:
        rel = _as_rel(rel)
        n_rel = np.asarray(n_rel).reshape(-1)
        for k in self.ks:
            self._add(f"precision@{k}", precision_at_k(rel, k))
            self._add(f"ap@{k}", ap_at_k(rel, n_rel, k))
        self._add("ap", average_precision(rel, n_rel))
        self._add("pr", pr_curve(rel, n_rel))
        self._add("n_rel", n_rel)
        if self.with_ns:
            self._add("ns", ns_score(rel, self.self_in_gallery))

    def per_query(self, key: str) -> np.ndarray:
        return np.concatenate(self.parts[key]) if key in self.parts else np.zeros(0)

    def n_queries(self) -> int:
        """Queries seen (with or without relevant items)."""
        return len(self.per_query("n_rel"))

    def n_evaluated(self) -> int:
        """Queries the means are taken over: those with at least one relevant gallery item."""
        return int((self.per_query("n_rel") > 0).sum())

    def summary(self) -> Dict[str, Optional[float]]:
        """Means over the queries with at least one relevant gallery item (the others are left out of every mean);
        None where no query has one (the mean is undefined), never NaN."""
        valid = self.per_query("n_rel") > 0

        def mean(key: str) -> Optional[float]:
            v = self.per_query(key)[valid] if key in self.parts else np.zeros(0)
            v = v[np.isfinite(v)]
            return float(v.mean()) if len(v) else None

        out: Dict[str, Optional[float]] = {}
        for k in self.ks:
            out[f"precision@{k}"] = mean(f"precision@{k}")
        for k in self.ks:
            out[f"ap@{k}"] = mean(f"ap@{k}")
        out["map"] = mean("ap")
        if self.with_ns:
            out["ns_score"] = mean("ns")
        return out

    def pr(self) -> np.ndarray:
        """Mean interpolated precision at the 11 recall levels (NaN where no query has a relevant item: write it
        through :func:`finite_or_none`)."""
        valid = self.per_query("n_rel") > 0
        return np.nanmean(self.per_query("pr")[valid], axis=0) if valid.any() else np.full(11, np.nan)
