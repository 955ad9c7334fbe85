"""Query expansion (alpha-QE) and database-side augmentation (DBA) on cosine indexes.

Radenovic, Tolias, Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018:

* alpha-QE: a query q is replaced by l2n(q + sum_i s_i^alpha x_i) over its top ``qe_k`` results x_i
  (s_i = q.x_i, negative similarities weigh 0; q itself has weight 1^alpha = 1), then searched again.
* DBA: every gallery vector x is replaced, once, by the same weighted mean over its own top ``dba_k``
  neighbours (itself excluded); queries are searched against the augmented gallery.

Neighbours always come from a ``search(vectors, k, exclude)`` function (the index's), in batches: no
(N, N) matrix is formed. The augmented gallery is searched by a flat inner-product faiss index.

Leave-one-out: a query that is gallery row r (``exclude[i] = r``) is kept out of everything it would
see of itself. Its own first search excludes r, so r never enters its expansion; and with DBA, the
gallery vectors that r helped augment (those with r among their ``dba_k`` neighbours) are recomputed
for that query without r (r replaced by their next neighbour), so the query does not find itself
mixed into its neighbours. Scores returned are similarities to the (expanded) query.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

from ..errors import CbirError

SearchFn = Callable[..., Tuple[np.ndarray, np.ndarray]]

#: alpha of the paper (and cirtorch / revisitop) for both alpha-QE and DBA
DEFAULT_ALPHA = 3.0
#: results averaged into a query by ``--expand`` alone (benchmarks/expansion.py)
DEFAULT_QE_K = 2
#: the largest k of alpha-QE / DBA / diffusion accepted (a manifest or request cannot make the graph stage allocate more)
MAX_K = 1000
#: the graph stage an index built without --graph records, chosen by benchmarks/suite.py (README "Graph stage")
DEFAULT_GRAPH: Dict[str, Any] = {"qe_k": 5, "alpha": 3.0, "dba_k": 7}


def parse_expand(expand: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """``{"qe_k": int, "alpha": float, "dba_k": int}`` (missing keys: 0, 3.0, 0), or None when both k are 0."""
    if not expand:
        return None
    if not isinstance(expand, dict):
        raise CbirError(f"expand: expected a dict with qe_k, alpha, dba_k, got {expand!r}")
    unknown = sorted(set(expand) - {"qe_k", "alpha", "dba_k", "diffusion"})
    if unknown:
        raise CbirError(f"expand: unknown option(s) {unknown}; options: ['alpha', 'dba_k', 'diffusion', 'qe_k']")
    out = {}
    for key in ("qe_k", "dba_k"):
        v = expand.get(key) or 0
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer)) or int(v) != v or not 0 <= int(v) <= MAX_K:
            raise CbirError(f"expand: {key} must be an integer from 0 to {MAX_K}, got {v!r}")
        out[key] = int(v)
    a = expand.get("alpha", DEFAULT_ALPHA)
    try:
        a = float(DEFAULT_ALPHA if a is None else a)
    except (TypeError, ValueError):
        raise CbirError(f"expand: alpha must be a number, got {a!r}") from None
    if not np.isfinite(a) or a < 0:
        raise CbirError(f"expand: alpha must be a non-negative number, got {a}")
    out["alpha"] = a
    from .diffusion import parse as parse_diffusion

    diff = parse_diffusion(expand.get("diffusion"))
    if diff is not None:
        if out["qe_k"]:
            raise CbirError("expand: diffusion replaces alpha-QE (it spreads the query over the gallery graph); drop qe_k")
        out["diffusion"] = diff
    return out if out["qe_k"] or out["dba_k"] or diff else None


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def sim_weights(sims: np.ndarray, alpha: float, valid: Optional[np.ndarray] = None) -> np.ndarray:
    """max(s, 0)^alpha, 0 where ``valid`` is False (missing neighbours, id -1)."""
    w = np.maximum(np.asarray(sims, np.float32), 0.0) ** np.float32(alpha)
    return w if valid is None else np.where(valid, w, 0.0).astype(np.float32)


def alpha_qe(q: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float,
             valid: Optional[np.ndarray] = None) -> np.ndarray:
    """Expanded queries ``(B, d)``: l2n(q + sum_i w_i x_i) with q ``(B, d)``, neighbours ``(B, k, d)``, sims ``(B, k)``."""
    w = sim_weights(sims, alpha, valid)
    return _l2n(np.asarray(q, np.float32) + np.einsum("bk,bkd->bd", w, np.asarray(neighbours, np.float32)))


def neighbours(x: np.ndarray, search: SearchFn, k: int, batch: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
    """(sims, ids) ``(n, k)`` of each gallery row's top ``k`` other rows (ids -1 where the gallery has fewer)."""
    n = len(x)
    ids = np.full((n, k), -1, np.int64)
    sims = np.zeros((n, k), np.float32)
    for a in range(0, n, batch):
        b = min(n, a + batch)
        s, i = search(x[a:b], k, exclude=np.arange(a, b))
        ids[a:b, : i.shape[1]] = i
        sims[a:b, : s.shape[1]] = s
    sims[ids < 0] = 0.0
    return sims, ids


def dba(x: np.ndarray, ids: np.ndarray, sims: np.ndarray, alpha: float) -> np.ndarray:
    """Augmented gallery: l2n(x_j + sum_p w_jp x_{ids[j, p]}) for neighbour lists ``ids`` / ``sims`` ``(n, k)``."""
    return _l2n(_dba_sums(np.asarray(x, np.float32), ids, sim_weights(sims, alpha, ids >= 0)))


def _dba_sums(x: np.ndarray, ids: np.ndarray, w: np.ndarray) -> np.ndarray:
    u = x.copy()
    for p in range(ids.shape[1]):  # one (n, d) gather at a time
        u += w[:, p, None] * x[np.maximum(ids[:, p], 0)]
    return u


#: galleries larger than this search DBA by a shortlist (below: an exact scan of the augmented gallery)
SHORTLIST_FROM = 50_000
#: plain-search candidates re-scored against their augmented vectors per query in shortlist mode
SHORTLIST = 1000


class Expander:
    """Searches a gallery ``x`` (L2-normalised rows) with alpha-QE and/or DBA; ``search`` is the index's own.

    DBA is searched exactly (a flat scan of the augmented gallery, made once) up to :data:`SHORTLIST_FROM` images;
    beyond, by a shortlist (``shortlist`` candidates of the index's own search, re-scored against their augmented
    vectors, made on the fly from the k-NN graph: nothing is made at open, a query costs the plain search and
    ``shortlist x (dba_k + 1)`` vector reads; results past the shortlist keep the plain order). ``shortlist``: force a
    mode (0: exact scan; N: a shortlist of N).
    """

    def __init__(self, x: np.ndarray, search: SearchFn, qe_k: int = 0, alpha: float = DEFAULT_ALPHA, dba_k: int = 0,
                 batch: int = 1024, knn: Optional[Callable[[int], Tuple[np.ndarray, np.ndarray]]] = None,
                 shortlist: Optional[int] = None) -> None:
        self.x = x if isinstance(x, np.ndarray) and x.dtype == np.float32 else np.ascontiguousarray(x, np.float32)
        self.n, self.d = self.x.shape
        self.base_search = search
        self.qe_k, self.alpha, self.dba_k = int(qe_k), float(alpha), int(dba_k)
        self.dba_k = min(self.dba_k, max(0, self.n - 1))
        self._flat = None
        self.shortlist = (SHORTLIST if self.n > SHORTLIST_FROM else 0) if shortlist is None else int(shortlist)
        if self.dba_k:
            # one neighbour more than used: the replacement when a left-out query was one of them
            sims, ids = knn(self.dba_k + 1) if knn is not None else neighbours(self.x, search, self.dba_k + 1, batch)
            sims, ids = sims[:, : self.dba_k + 1], ids[:, : self.dba_k + 1]
            self.nbr, self.w = ids, sim_weights(sims, self.alpha, ids >= 0)
            if self.shortlist:
                self.gallery = None
                return
            u = _dba_sums(self.x, ids[:, : self.dba_k], self.w[:, : self.dba_k])
            self.u_norm = np.maximum(np.linalg.norm(u, axis=1), 1e-12).astype(np.float32)
            self.gallery = (u / self.u_norm[:, None]).astype(np.float32)
            flat = ids[:, : self.dba_k].ravel()
            self._rev_order = np.argsort(flat, kind="stable")
            self._rev_sorted = flat[self._rev_order]
            import faiss

            self._flat = faiss.IndexFlatIP(self.d)
            self._flat.add(self.gallery)
        else:
            self.gallery = self.x

    def describe(self) -> Dict[str, Any]:
        return {"qe_k": self.qe_k, "alpha": self.alpha, "dba_k": self.dba_k}

    # -- shortlist mode: augmented vectors made on the fly -----------------------------------------------
    def _augmented(self, rows: np.ndarray, r: int = -1) -> np.ndarray:
        """The DBA vectors of ``rows``, each from its first ``dba_k`` neighbours other than the left-out row ``r``."""
        rows = np.asarray(rows, np.int64)
        nb, w = self.nbr[rows], self.w[rows]
        use = (nb >= 0) & (nb != r) if r >= 0 else nb >= 0
        use &= np.cumsum(use, axis=1) <= self.dba_k
        u = np.asarray(self.x[rows], np.float32).copy()
        for p in range(nb.shape[1]):
            wp = np.where(use[:, p], w[:, p], 0.0).astype(np.float32)
            if wp.any():
                u += wp[:, None] * np.asarray(self.x[np.maximum(nb[:, p], 0)], np.float32)
        return _l2n(u)

    def _shortlist_search(self, q: np.ndarray, k: int, exclude: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        k = int(min(k, self.n))
        ex = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
        s0, cand = self.base_search(q, max(k, min(self.shortlist, self.n)), exclude=exclude)
        out_s = np.zeros((len(q), k), np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for b in range(len(q)):
            c = cand[b][cand[b] >= 0]
            head, tail = c[: self.shortlist], c[self.shortlist :]
            sc = self._augmented(head, int(ex[b])) @ q[b] if len(head) else np.zeros(0, np.float32)
            order = np.argsort(-sc, kind="stable")
            ids = np.concatenate([head[order], tail])[:k]
            scores = np.concatenate([sc[order], np.minimum(s0[b][cand[b] >= 0][self.shortlist :], sc.min() if len(sc) else 0)])[:k]
            out_i[b, : len(ids)], out_s[b, : len(ids)] = ids, scores
        return out_s, out_i

    # -- leave-one-out corrections of the augmented gallery --------------------------------------------
    def _without(self, r: int) -> Tuple[np.ndarray, np.ndarray]:
        """(rows, vectors): the augmented rows that used gallery row ``r``, recomputed without it."""
        if not self.dba_k or r < 0:
            return np.zeros(0, np.int64), np.zeros((0, self.d), np.float32)
        lo, hi = np.searchsorted(self._rev_sorted, [r, r + 1])
        flat = self._rev_order[lo:hi]
        js, ps = flat // self.dba_k, flat % self.dba_k
        if not len(js):
            return js, np.zeros((0, self.d), np.float32)
        u = self.gallery[js] * self.u_norm[js, None] - self.w[js, ps, None] * self.x[r]
        nxt = self.nbr[js, self.dba_k]
        u += np.where(nxt >= 0, self.w[js, self.dba_k], 0.0)[:, None] * self.x[np.maximum(nxt, 0)]
        return js, _l2n(u)

    def _gallery_search(self, q: np.ndarray, k: int, exclude: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        if not self.dba_k:
            return self.base_search(q, k, exclude=exclude)
        if self.shortlist:
            return self._shortlist_search(q, k, exclude)
        k = int(min(k, self.n))
        ex = np.full(len(q), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
        fixes = [self._without(int(r)) for r in ex]
        extra = max((len(js) for js, _ in fixes), default=0) + 1
        kk = min(self.n, k + extra)
        s, ids = self._flat.search(np.ascontiguousarray(q, np.float32), kk)
        out_s = np.zeros((len(q), k), np.float32)
        out_i = np.full((len(q), k), -1, np.int64)
        for b in range(len(q)):
            js, vj = fixes[b]
            keep = (ids[b] >= 0) & (ids[b] != ex[b]) & ~np.isin(ids[b], js)
            si, ii = s[b][keep], ids[b][keep]
            if len(js):  # the rows r helped augment, scored as if r were not in the gallery
                si, ii = np.concatenate([si, vj @ q[b]]), np.concatenate([ii, js])
            order = np.argsort(-si, kind="stable")[:k]
            out_s[b, : len(order)], out_i[b, : len(order)] = si[order], ii[order]
        return out_s, out_i

    def _vectors(self, ids: np.ndarray, exclude: Optional[np.ndarray]) -> np.ndarray:
        """Augmented gallery vectors of ``ids`` ``(B, k)`` as each query sees them (zeros for -1)."""
        if self.dba_k and self.shortlist:
            ex = np.full(len(ids), -1, np.int64) if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
            return np.stack([self._augmented(np.maximum(row, 0), int(r)) * (row >= 0)[:, None] for row, r in zip(ids, ex)])
        if self.gallery is self.x and not self.dba_k:
            return np.asarray(self.x[np.maximum(ids, 0)], np.float32) * (ids >= 0)[..., None]
        v = self.gallery[np.maximum(ids, 0)] * (ids >= 0)[..., None]
        if self.dba_k and exclude is not None:
            for b, r in enumerate(np.asarray(exclude).reshape(-1)):
                js, vj = self._without(int(r))
                for j, vec in zip(js, vj):
                    v[b][ids[b] == j] = vec
        return v

    # -- the search -----------------------------------------------------------------------------------------
    def search(self, q: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top ``k`` of each query (``(scores, ids)``, as the index's search), expanded as configured."""
        q = np.ascontiguousarray(q, np.float32)
        if not self.qe_k:
            return self._gallery_search(q, k, exclude)
        s, ids = self._gallery_search(q, self.qe_k, exclude)
        q2 = alpha_qe(q, self._vectors(ids, exclude), s, self.alpha, ids >= 0)
        return self._gallery_search(q2, k, exclude)


def for_index(idx, expand: Optional[Dict[str, Any]]) -> Optional[Expander]:
    """The :class:`Expander` of an opened index for ``expand`` (cached on it: DBA is computed once), or None."""
    spec = parse_expand(expand)
    if spec is None:
        return None
    if idx.metric != "cosine":
        raise CbirError(f"{idx.folder}: query expansion / DBA need a cosine index of float descriptors; "
                        f"this one compares {idx.metric} codes (build it with a float extractor, e.g. fused)")
    cache = idx.__dict__.setdefault("_expanders", {})
    key = (spec["qe_k"], spec["alpha"], spec["dba_k"])
    if key not in cache:
        cache[key] = Expander(np.asarray(idx.descriptors), idx.search, qe_k=spec["qe_k"], alpha=spec["alpha"],
                              dba_k=spec["dba_k"], knn=lambda k: knn_graph(idx, k))
    return cache[key]


def knn_graph(idx, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(sims, rows) ``(n, >= k)`` of each gallery row's nearest other rows: the index's stored graph when it holds
    enough neighbours (cbir/index/knn.py), else computed once with the index's own search and kept on ``idx``."""
    cache = idx.__dict__.setdefault("_knn", {})
    have = max((kk for kk in cache if kk >= k), default=None)
    if have is None:
        stored = getattr(idx, "stored_knn", None)
        got = stored(k) if stored is not None else None
        if got is None:
            got = neighbours(np.asarray(idx.descriptors), idx.search, int(k))
        cache[got[1].shape[1]] = got
        have = got[1].shape[1]
    return cache[have]


class Searcher:
    """The search stage of an opened index: plain top-k, or the graph stage ``spec`` (alpha-QE / DBA) over it.

    ``searcher(vectors, k, exclude=None)`` answers like the index's own ``search``; :meth:`describe` says what is
    applied (None: plain search), the ``expand`` that reports and ``--json`` carry.
    """

    def __init__(self, idx, spec: Optional[Dict[str, Any]]) -> None:
        self.spec = parse_expand(spec)
        if self.spec and idx.metric != "cosine":
            raise CbirError(f"{idx.folder}: query expansion, DBA and diffusion need a cosine index of float descriptors; "
                            f"this one compares {idx.metric} codes (build it with a float extractor, e.g. pooled)")
        diff = (self.spec or {}).get("diffusion")
        self.expander = for_index(idx, self.spec) if self.spec and (self.spec["qe_k"] or self.spec["dba_k"]) else None
        self._search = self.expander.search if self.expander is not None else idx.search
        self._plain = idx.search
        if diff:
            from .diffusion import Diffusion

            sims, ids = knn_graph(idx, diff["k"] + 1)
            self._search = Diffusion(len(idx), ids, sims, self._search, diff).search

    def __call__(self, q: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        s, ids = self._search(q, k, exclude=exclude)
        if self.spec is None:
            return s, ids
        return _copies_first(q, s, ids, self._plain, exclude)

    def describe(self) -> Optional[Dict[str, Any]]:
        return self.spec

    def without_qe(self, q: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """The same stage with alpha-QE left out (DBA and diffusion kept): for a query that is already an expansion,
        e.g. by verified results (cbir/local/rerank.py: spatially verified QE)."""
        q = np.ascontiguousarray(q, np.float32)
        if self.expander is not None and self.expander.qe_k and not (self.spec or {}).get("diffusion"):
            s, ids = self.expander._gallery_search(q, k, exclude)
        else:
            s, ids = self._search(q, k, exclude=exclude)
        return (s, ids) if self.spec is None else _copies_first(q, s, ids, self._plain, exclude)


#: cosine at or above which a gallery image is the query itself (the same pixels: float rounding only)
COPY_COSINE = 0.99999


def _copies_first(q, s, ids, plain, exclude, look: int = 4):
    """A gallery copy of the query itself keeps rank 1 (with its plain similarity): the graph stage scores the query
    against augmented or diffused vectors, where an exact copy can slip behind a close neighbour."""
    s0, i0 = plain(q, look, exclude=exclude)
    for b in range(len(q)):
        dup = [int(i) for i, v in zip(i0[b], s0[b]) if i >= 0 and v >= COPY_COSINE]
        if not dup or list(ids[b, : len(dup)]) == dup:
            continue
        rest = [(int(i), float(v)) for i, v in zip(ids[b], s[b]) if i >= 0 and int(i) not in dup]
        top = max([float(s[b].max()) if s.shape[1] else 1.0] + [float(v) for i, v in zip(i0[b], s0[b]) if int(i) in dup])
        merged = [(i, top) for i in dup] + rest
        merged = merged[: ids.shape[1]]
        ids[b] = -1
        s[b] = 0.0
        ids[b, : len(merged)] = [i for i, _ in merged]
        s[b, : len(merged)] = [v for _, v in merged]
    return s, ids


def searcher(idx, expand: Any = "index") -> Searcher:
    """The :class:`Searcher` of ``idx`` for ``expand``: ``"index"`` (what its manifest records as its graph stage;
    plain search for an index that records none), None / False (plain search) or a spec dict."""
    if isinstance(expand, str):
        if expand != "index":
            raise CbirError(f"expand: expected 'index', None or a dict, got {expand!r}")
        expand = idx.manifest.get("graph")
        if expand is not None and idx.metric != "cosine":
            expand = None
    return Searcher(idx, expand or None)
