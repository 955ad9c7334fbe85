"""Mutual nearest-neighbour matching on L2-normalised descriptors (numpy, bounded memory).

Similarities are computed in blocks of at most ``max_elements`` entries: one pair is split by rows, and
:meth:`MNN.match_many` packs several candidates into one matrix product with the query while the block stays under
that bound.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CbirError
from ..vectors import l2n
from .base import MATCHERS, Features, Matches, SparseMatcher, check_features, empty_matches


def _best_two(sim: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: index of the best column, best and second-best similarity (``-inf`` when one column)."""
    idx = np.argmax(sim, axis=1)
    best = sim[np.arange(sim.shape[0]), idx]
    if sim.shape[1] > 1:
        second = np.partition(sim, sim.shape[1] - 2, axis=1)[:, -2]
    else:
        second = np.full(sim.shape[0], -np.inf, sim.dtype)
    return idx, best, second


def _dist(sim: np.ndarray) -> np.ndarray:
    """L2 distance of unit vectors from their dot product."""
    return np.sqrt(np.maximum(2.0 - 2.0 * sim, 0.0))


def mnn_from_blocks(d0: np.ndarray, d1: np.ndarray, conf: Dict[str, Any], max_elements: int) -> Matches:
    """Mutual nearest neighbours between ``d0`` (N0, D) and ``d1`` (N1, D), row blocks bounded by ``max_elements``."""
    n0, n1 = d0.shape[0], d1.shape[0]
    rows = max(1, int(max_elements) // max(n1, 1))
    idx01 = np.empty(n0, np.int64)
    best01 = np.empty(n0, np.float32)
    second01 = np.empty(n0, np.float32)
    col_best = np.full(n1, -np.inf, np.float32)
    col_arg = np.zeros(n1, np.int64)
    for start in range(0, n0, rows):
        sim = d0[start : start + rows] @ d1.T
        i, b, s = _best_two(sim)
        idx01[start : start + len(i)], best01[start : start + len(i)], second01[start : start + len(i)] = i, b, s
        cb = sim.max(axis=0)
        ca = np.argmax(sim, axis=0) + start
        better = cb > col_best  # strict: the first row keeps ties, as a full argmax would
        col_best[better], col_arg[better] = cb[better], ca[better]
    return _select(idx01, best01, second01, col_arg, conf)


def _select(idx01: np.ndarray, best01: np.ndarray, second01: np.ndarray, col_arg: np.ndarray, conf: Dict[str, Any]) -> Matches:
    keep = np.ones(idx01.shape[0], bool)
    if conf["mutual"]:
        keep &= col_arg[idx01] == np.arange(idx01.shape[0])
    if conf["distance_threshold"] is not None:
        keep &= _dist(best01) <= float(conf["distance_threshold"])
    if conf["ratio_threshold"] is not None:
        keep &= _dist(best01) <= float(conf["ratio_threshold"]) * _dist(second01)
    i0 = np.nonzero(keep)[0]
    return {"matches": np.stack([i0, idx01[i0]], axis=1).astype(np.int64).reshape(-1, 2), "scores": best01[i0].astype(np.float32)}


@MATCHERS.register("mnn")
class MNN(SparseMatcher):
    """Mutual nearest neighbours, with optional Lowe ratio test and L2 distance threshold (on unit descriptors)."""

    name = "mnn"
    default_conf: Dict[str, Any] = {
        "mutual": True,
        "ratio_threshold": None,  # e.g. 0.8
        "distance_threshold": None,  # L2 between unit descriptors, e.g. 0.7
        "max_elements": 16_000_000,  # similarity entries per block (64 MB of float32)
    }

    def _match(self, feats0: Features, feats1: Features) -> Matches:
        return mnn_from_blocks(l2n(feats0["descriptors"]), l2n(feats1["descriptors"]), self.conf, int(self.conf["max_elements"]))

    def match_many(self, query: Features, candidates: Sequence[Features]) -> List[Matches]:
        """One query against many candidates, several candidates per matrix product (bounded by ``max_elements``)."""
        check_features(query, "query features")
        q = l2n(query["descriptors"])
        limit = int(self.conf["max_elements"])
        out: List[Matches] = [empty_matches() for _ in candidates]
        group: List[int] = []
        cols = 0

        def flush() -> None:
            nonlocal group, cols
            if not group:
                return
            descs = [l2n(candidates[k]["descriptors"]) for k in group]
            sim = q @ np.concatenate(descs, axis=0).T
            start = 0
            for k, d in zip(group, descs):
                block = sim[:, start : start + d.shape[0]]
                start += d.shape[0]
                i, b, s = _best_two(block)
                out[k] = _select(i, b, s, np.argmax(block, axis=0), self.conf)
            group, cols = [], 0

        for k, c in enumerate(candidates):
            check_features(c, f"candidate {k} features")
            n = len(c["keypoints"])
            if n == 0 or q.shape[0] == 0:
                continue
            if np.asarray(c["descriptors"]).shape[1] != q.shape[1]:
                raise CbirError(f"matcher 'mnn': candidate {k} has {np.asarray(c['descriptors']).shape[1]}-D descriptors, the query {q.shape[1]}-D")
            if q.shape[0] * n > limit:  # too big to pack: match it alone, by row blocks
                out[k] = self.match(query, c)
                continue
            if q.shape[0] * (cols + n) > limit:
                flush()
            group.append(k)
            cols += n
        flush()
        return out


@MATCHERS.register("kdtree")
class KDTree(SparseMatcher):
    """Seed 000: ``cKDTree`` over image 0's descriptors, each descriptor of image 1 takes its nearest neighbour
    within ``distance_upper_bound`` (L2). Not mutual; score = ``1 - distance / distance_upper_bound``."""

    name = "kdtree"
    default_conf: Dict[str, Any] = {"distance_upper_bound": 0.8, "workers": 1}

    def _match(self, feats0: Features, feats1: Features) -> Matches:
        from scipy.spatial import cKDTree

        d0 = np.asarray(feats0["descriptors"], np.float32)
        d1 = np.asarray(feats1["descriptors"], np.float32)
        ub = float(self.conf["distance_upper_bound"])
        dist, idx = cKDTree(d0).query(d1, k=1, distance_upper_bound=ub, workers=int(self.conf["workers"]))
        valid = idx < d0.shape[0]  # a miss is reported as index N0 with infinite distance
        i1 = np.nonzero(valid)[0]
        return {
            "matches": np.stack([idx[valid], i1], axis=1).astype(np.int64).reshape(-1, 2),
            "scores": (1.0 - dist[valid] / ub).astype(np.float32),
        }


def batched_mutual_nn(query: np.ndarray, candidates: Sequence[np.ndarray], max_elements: int = 16_000_000,
                      min_similarity: Optional[float] = None, with_ratio: bool = False) -> List[Tuple[np.ndarray, ...]]:
    """Mutual nearest neighbours of ``query`` ``(Nq, D)`` against every candidate ``(Ni, D)`` at once.

    The candidates are stacked into one zero-padded ``(C, Nmax, D)`` block per chunk, and one matrix product
    ``(C * Nmax, D) x (D, Nq)`` (torch) gives every similarity; padded rows are masked out, and both arg-maxes run over
    the whole block, so no Python loop runs per pair except to slice the results. Chunks keep ``C * Nmax * Nq`` under
    ``max_elements``. Descriptors are expected L2-normalised (float32 or float16). ``min_similarity`` drops mutual
    pairs below that dot product.

    Returns per candidate ``(i_query, i_candidate, similarity)``, and with ``with_ratio`` a fourth array: Lowe's ratio
    of each match, the L2 distance to the candidate keypoint's nearest query descriptor over that to its second
    nearest (one more max over the block; 1 when the query has a single descriptor).
    """
    import torch

    q = np.ascontiguousarray(query, dtype=np.float32)
    tq = torch.from_numpy(q)
    out: List[Tuple[np.ndarray, ...]] = []
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)) + ((np.zeros(0, np.float32),) if with_ratio else ())
    nq = q.shape[0]
    sizes = [int(np.asarray(c).shape[0]) for c in candidates]
    for k, c in enumerate(candidates):
        if sizes[k] and np.asarray(c).shape[1] != q.shape[1]:
            raise CbirError(f"mutual NN: candidate {k} has {np.asarray(c).shape[1]}-D descriptors, the query {q.shape[1]}-D")
    start = 0
    while start < len(candidates):
        # grow the chunk while C * Nmax * Nq stays under the bound (one candidate at least)
        stop, nmax = start, 0
        while stop < len(candidates):
            m = max(nmax, sizes[stop])
            if stop > start and (stop - start + 1) * m * max(nq, 1) > max_elements:
                break
            nmax, stop = m, stop + 1
        chunk = range(start, stop)
        start = stop
        if nq == 0 or nmax == 0:
            out.extend(empty for _ in chunk)
            continue
        C = len(chunk)
        block = np.zeros((C, nmax, q.shape[1]), np.float32)
        pad = np.zeros((C, nmax), bool)
        for j, k in enumerate(chunk):
            block[j, : sizes[k]] = candidates[k]
            pad[j, sizes[k] :] = True
        with torch.inference_mode():
            sim = torch.matmul(torch.from_numpy(block).reshape(C * nmax, -1), tq.T).reshape(C, nmax, nq)
            if pad.any():
                sim[torch.from_numpy(pad)] = -torch.inf  # padded rows never win
            best_sim_t, best_c_t = sim.max(dim=1)  # (C, Nq): best candidate row for each query row
            if with_ratio and nq > 1:
                top2, top2_i = sim.topk(2, dim=2)  # (C, Nmax, 2): each candidate row's two best query rows
                best_q_t, second_t = top2_i[..., 0], top2[..., 1]
            else:
                best_q_t, second_t = sim.argmax(dim=2), None
            back = torch.gather(best_q_t, 1, best_c_t)  # (C, Nq)
            mutual_t = back == torch.arange(nq)[None, :]
            if min_similarity is not None:
                mutual_t &= best_sim_t >= float(min_similarity)
            ratio_t = None
            if with_ratio:
                if second_t is not None:
                    second_at = torch.gather(second_t, 1, best_c_t)  # at the matched candidate row
                    d1 = torch.sqrt(torch.clamp(2.0 - 2.0 * best_sim_t, min=0.0))
                    d2 = torch.sqrt(torch.clamp(2.0 - 2.0 * second_at, min=0.0))
                    ratio_t = torch.where(d2 > 0, d1 / torch.clamp(d2, min=1e-12), torch.ones_like(d1))
                else:
                    ratio_t = torch.ones_like(best_sim_t)
        mutual, best_c, best_sim = mutual_t.numpy(), best_c_t.numpy(), best_sim_t.numpy()
        ratio = None if ratio_t is None else ratio_t.numpy().astype(np.float32)
        for j, k in enumerate(chunk):
            if sizes[k] == 0:
                out.append(empty)
                continue
            i0 = np.flatnonzero(mutual[j])
            r = (i0.astype(np.int64), best_c[j, i0].astype(np.int64), best_sim[j, i0].astype(np.float32))
            out.append(r + ((ratio[j, i0],) if with_ratio else ()))
    return out
