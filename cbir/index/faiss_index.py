"""faiss indexes: cosine similarity on L2-normalised floats, Hamming distance on packed binary codes.

Searches run in query chunks that keep only the top k, so no (Q, N) matrix is ever held whole.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import numpy as np

from ..errors import CbirError, IndexMismatch
from .atomic import write_faiss

#: Upper bound on the bytes of one chunk's (queries x k) results.
CHUNK_BYTES = 256 * 1024 * 1024


def _faiss():
    import faiss

    return faiss


def l2_normalise(x: np.ndarray, what: str = "descriptor") -> np.ndarray:
    """Row-wise L2 normalisation; a zero row raises, naming its position."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    bad = np.flatnonzero(~np.isfinite(n[:, 0]) | (n[:, 0] < 1e-12))
    if len(bad):
        raise CbirError(f"{len(bad)} {what}(s) with zero or non-finite norm (rows {bad[:5].tolist()})")
    return x / n


def _chunk_size(k: int) -> int:
    return int(max(1, min(4096, CHUNK_BYTES // max(1, 12 * k))))


def check_queries(q: np.ndarray, metric: str, dim: int) -> None:
    """Refuse queries that do not fit an index: packed uint8 codes of ``dim`` bits (Hamming), ``dim``-d floats (cosine)."""
    if metric == "hamming":
        if q.ndim != 2 or q.dtype != np.uint8 or q.shape[1] * 8 != dim:
            raise IndexMismatch(f"query of shape {q.shape} ({q.dtype}) does not fit a Hamming index of {dim}-bit codes")
    elif q.ndim != 2 or q.shape[1] != dim or q.dtype == np.uint8:
        raise IndexMismatch(f"query of shape {q.shape} ({q.dtype}) does not fit a cosine index of {dim}-d float vectors")


def search_sizes(k: int, n: int, exclude) -> Tuple[int, int]:
    """``(k, kk)``: the results a query gets from ``n`` vectors (``k`` cut to ``n``) and how many to ask the index for
    (one more when a result may be excluded: leave-one-out)."""
    k = int(min(k, n))
    return k, min(n, k + (1 if exclude is not None else 0))


class FaissSearch:
    """What the faiss-backed searches share (:class:`CosineIndex`, :class:`HammingIndex`, :class:`~cbir.index.backend.FaissBackend`)."""

    metric = ""

    def __init__(self, index, dim: int) -> None:
        self.index = index
        self.dim = dim

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def save(self, path: os.PathLike) -> None:
        raise NotImplementedError

    def _check(self, q: np.ndarray) -> None:
        check_queries(q, self.metric, self.dim)

    def _raw_search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` results per query, best first: ``(scores, ids)``, ids ``-1`` where fewer exist.

        ``exclude[i]`` (a gallery id or -1) is removed from query ``i``'s results: leave-one-out.
        Scores are similarities (higher is better) for both metrics: cosine, or ``1 - hamming / bits``.
        """
        self._check(queries)
        nq = len(queries)
        k, kk = search_sizes(k, self.ntotal, exclude)
        if k <= 0 or nq == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        out_s = np.zeros((nq, k), np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        step = _chunk_size(kk)
        for a in range(0, nq, step):
            s, i = self._raw_search(queries[a : a + step], kk)
            if exclude is not None:
                ex = np.asarray(exclude[a : a + step]).reshape(-1, 1)
                keep = i != ex
                # drop the excluded id, keep order, take the first k of each row
                order = np.argsort(~keep, axis=1, kind="stable")
                s = np.take_along_axis(s, order, 1)
                i = np.take_along_axis(i, order, 1)
                valid = np.take_along_axis(keep, order, 1)
                i = np.where(valid, i, -1)
            out_s[a : a + step] = s[:, :k]
            out_i[a : a + step] = i[:, :k]
        return out_s, out_i


class CosineIndex(FaissSearch):
    """Inner product on L2-normalised float32 vectors (faiss IndexFlatIP, or HNSW with ``ann='hnsw'``)."""

    metric = "cosine"

    def __init__(self, dim: int, ann: str = "flat", hnsw_m: int = 32, ef_search: int = 128, index=None) -> None:
        faiss = _faiss()
        if index is None:
            if ann == "flat":
                index = faiss.IndexFlatIP(dim)
            elif ann == "hnsw":
                index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efSearch = ef_search
                index.hnsw.efConstruction = max(40, 2 * hnsw_m)
            else:
                raise CbirError(f"unknown --ann {ann!r}: choose flat or hnsw")
        super().__init__(index, dim)
        self.ann = ann

    def add(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise IndexMismatch(f"descriptors of shape {x.shape} do not fit a cosine index of dimension {self.dim}")
        self.index.add(l2_normalise(x))

    def _raw_search(self, q, k):
        return self.index.search(l2_normalise(q, "query descriptor"), k)

    def save(self, path: os.PathLike) -> None:
        write_faiss(self.index, path)

    @classmethod
    def load(cls, path: os.PathLike, ann: str = "flat") -> "CosineIndex":
        index = _faiss().read_index(str(path))
        return cls(index.d, ann=ann, index=index)


class HammingIndex(FaissSearch):
    """Hamming distance on packed binary codes (faiss IndexBinaryFlat); ``bits`` must be a multiple of 8."""

    metric = "hamming"

    def __init__(self, bits: int, index=None) -> None:
        if bits % 8:
            raise CbirError(f"binary codes need a multiple of 8 bits, got {bits}")
        super().__init__(index if index is not None else _faiss().IndexBinaryFlat(bits), bits)

    def add(self, codes: np.ndarray) -> None:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2 or codes.shape[1] * 8 != self.dim:
            raise IndexMismatch(f"codes of shape {codes.shape} do not fit a Hamming index of {self.dim} bits")
        self.index.add(codes)

    def _raw_search(self, q, k):
        d, i = self.index.search(np.ascontiguousarray(q), k)
        return 1.0 - d.astype(np.float32) / self.dim, i

    def save(self, path: os.PathLike) -> None:
        write_faiss(self.index, path, binary=True)

    @classmethod
    def load(cls, path: os.PathLike) -> "HammingIndex":
        index = _faiss().read_index_binary(str(path))
        return cls(index.d, index=index)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """``(N, B)`` 0/1 -> ``(N, B/8)`` uint8, first bit in the most significant position (numpy packbits order)."""
    bits = np.asarray(bits)
    if bits.shape[1] % 8:
        raise CbirError(f"cannot pack {bits.shape[1]} bits: not a multiple of 8")
    return np.packbits(bits.astype(bool), axis=1)


def hamming_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Hamming distances between packed codes ``(Na, B)`` and ``(Nb, B)`` (reference implementation)."""
    x = np.bitwise_xor(a[:, None, :], b[None, :, :])
    return np.unpackbits(x, axis=2).sum(2)
