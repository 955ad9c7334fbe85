"""Diffusion on the gallery's k-NN graph (Iscen, Tolias, Avrithis, Furon, Chum, CVPR 2017), truncated at query time.

Offline, once: each gallery row's ``k`` nearest other rows and their similarities (the graph that DBA uses too:
cbir/index/knn.py keeps it in the index folder and up to date under add/remove). Per query:

1. the top ``truncate`` gallery rows of a plain search (the query's own row left out in leave-one-out);
2. on those rows only, the mutual k-NN affinities ``W_ij = min(a_ij, a_ji)`` with ``a_ij = max(s_ij, 0)^gamma``
   (``a_ij`` > 0 when j is among i's ``k`` neighbours), symmetrically normalised, ``S = D^-1/2 W D^-1/2``
   (D: W's row sums on that subgraph; in leave-one-out each row's ``k`` neighbours are its first ``k`` others, so
   the query's own row leaves no trace);
3. the query's affinities to its top ``kq`` rows as the initial vector ``y_i = max(s_qi, 0)^gamma``;
4. ``f`` solving ``(I - alpha S) f = y`` by conjugate gradient (``iters`` steps at most); rows are ranked by ``f``
   (ties, e.g. rows the diffusion does not reach, keep their order of step 1) and rows past ``truncate`` follow in
   their plain order. The scores returned are ``f``.

Memory and time: a ``truncate`` x ``truncate`` sparse matrix of at most ``truncate * k`` entries per query; no
(N, N) matrix is ever formed.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..errors import CbirError

SearchFn = Callable[..., Tuple[np.ndarray, np.ndarray]]

#: the parameters of the paper's global-descriptor setting, truncation as its Oxford/Paris experiments
DEFAULTS: Dict[str, Any] = {"k": 20, "kq": 10, "gamma": 3.0, "alpha": 0.99, "truncate": 1000, "iters": 20}
#: the largest value of each integer option (what a manifest or a request may make a query allocate)
LIMITS = {"k": 1000, "kq": 1000, "truncate": 100_000, "iters": 1000}


def parse(conf: Any) -> Optional[Dict[str, Any]]:
    """``{"k", "kq", "gamma", "alpha", "truncate", "iters"}`` with defaults filled in; None for no diffusion."""
    if conf is None or conf is False:
        return None
    if conf is True:
        conf = {}
    if not isinstance(conf, dict):
        raise CbirError(f"diffusion: expected a dict of {sorted(DEFAULTS)}, got {conf!r}")
    unknown = sorted(set(conf) - set(DEFAULTS))
    if unknown:
        raise CbirError(f"diffusion: unknown option(s) {unknown}; options: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **conf}
    for key in ("k", "kq", "truncate", "iters"):
        v = out[key]
        top = LIMITS[key]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (isinstance(v, float) and v.is_integer()) or not 1 <= int(v) <= top:
            raise CbirError(f"diffusion: {key} must be an integer from 1 to {top}, got {v!r}")
        out[key] = int(v)
    for key in ("gamma", "alpha"):
        try:
            out[key] = float(out[key])
        except (TypeError, ValueError):
            raise CbirError(f"diffusion: {key} must be a number, got {out[key]!r}") from None
    if not 0.0 < out["alpha"] < 1.0:
        raise CbirError(f"diffusion: alpha must be in (0, 1), got {out['alpha']}")
    if not np.isfinite(out["gamma"]) or out["gamma"] <= 0:
        raise CbirError(f"diffusion: gamma must be a positive number, got {out['gamma']}")
    return out


def _cg(matvec, y: np.ndarray, iters: int, tol: float = 1e-6) -> np.ndarray:
    """Conjugate gradient for a symmetric positive-definite operator (here I - alpha S), from x = 0."""
    x = np.zeros_like(y)
    r = y.copy()
    p = r.copy()
    rs = float(r @ r)
    stop = tol * tol * max(rs, 1e-30)
    for _ in range(iters):
        if rs <= stop:
            break
        ap = matvec(p)
        a = rs / max(float(p @ ap), 1e-30)
        x += a * p
        r -= a * ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x


def diffuse(nodes: np.ndarray, sims0: np.ndarray, nbr_ids: np.ndarray, nbr_sims: np.ndarray, n: int,
            conf: Dict[str, Any], exclude: int = -1) -> np.ndarray:
    """Diffusion scores ``f`` of ``nodes`` (gallery rows, in plain-search order, with their similarities ``sims0``).

    ``exclude``: a left-out gallery row (leave-one-out); each node's ``k`` neighbours are then its first ``k`` others
    (the graph keeps ``k + 1``), so the result is the one of a gallery that never held that row."""
    from scipy import sparse

    m = len(nodes)
    if m == 0:
        return np.zeros(0, np.float32)
    k, gamma = min(conf["k"], nbr_ids.shape[1]), conf["gamma"]
    pos = np.full(n, -1, np.int64)
    pos[nodes] = np.arange(m)
    nb = nbr_ids[nodes, : k + 1]
    ns = nbr_sims[nodes, : k + 1]
    first = (nb != exclude) if exclude >= 0 else np.ones(nb.shape, bool)
    first &= np.cumsum(first, axis=1) <= k
    cols = np.where((nb >= 0) & first, pos[np.maximum(nb, 0)], -1)
    w = np.maximum(ns.astype(np.float64), 0.0) ** gamma
    keep = (cols >= 0) & (w > 0)
    rows = np.broadcast_to(np.arange(m)[:, None], cols.shape)
    a = sparse.csr_matrix((w[keep], (rows[keep], cols[keep])), shape=(m, m))
    wm = a.minimum(a.T).tocsr()  # mutual neighbours only
    d = np.asarray(wm.sum(1)).ravel()
    dinv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-300)), 0.0)
    s = sparse.diags(dinv) @ wm @ sparse.diags(dinv)
    y = np.zeros(m)
    kq = min(conf["kq"], m)
    y[:kq] = np.maximum(np.asarray(sims0[:kq], np.float64), 0.0) ** gamma
    alpha = conf["alpha"]
    f = _cg(lambda v: v - alpha * (s @ v), y, conf["iters"])
    return f.astype(np.float32)


class Diffusion:
    """Searches with diffusion over a gallery graph ``(nbr_ids, nbr_sims)`` (rows, best first); ``search`` is the
    plain search of the same gallery (or of its DBA-augmented vectors)."""

    def __init__(self, n: int, nbr_ids: np.ndarray, nbr_sims: np.ndarray, search: SearchFn, conf: Dict[str, Any]) -> None:
        self.n = int(n)
        self.nbr_ids, self.nbr_sims = nbr_ids, nbr_sims
        self.base_search = search
        self.conf = conf

    def search(self, q: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        k = int(min(k, self.n))
        t = int(min(self.n, max(k, self.conf["truncate"])))
        s, ids = self.base_search(q, t, exclude=exclude)
        out_s = np.zeros((len(q), k), np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        ex = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
        for b in range(len(q)):
            ok = ids[b] >= 0
            nodes, s0 = ids[b][ok], s[b][ok]
            head = min(len(nodes), int(self.conf["truncate"]))
            f = diffuse(nodes[:head], s0[:head], self.nbr_ids, self.nbr_sims, self.n, self.conf, int(ex[b]))
            order = np.argsort(-f, kind="stable")
            ranked = np.concatenate([nodes[:head][order], nodes[head:]])[:k]
            scores = np.concatenate([f[order], np.zeros(len(nodes) - head, np.float32)])[:k]
            out_i[b, : len(ranked)], out_s[b, : len(ranked)] = ranked, scores
        return out_s, out_i
