"""The search structure behind an index folder: one faiss index with stable integer ids per image.

One small interface for every kind (``add(ids, vectors)``, ``remove(ids)``, ``search(queries, k)``, ``save``, ``open``):

* cosine (float descriptors, L2-normalised): optional PCA to ``dim`` (faiss ``PCAMatrix``, whitened by eigenvalue
  power -0.5 * ``whiten_power``, then L2 renormalisation; ``pca_centre=False`` projects without subtracting the mean,
  which keeps the raw descriptors' inner products), a codec (``float32``, ``float16`` or ``sq8`` scalar quantiser, ``pq``
  with ``code_bytes`` 8-bit sub-quantisers) and an ANN structure (``flat``: exact scan of the codes; ``ivf``:
  ``nlist`` inverted lists, ``nprobe`` visited per query; ``hnsw``: graph, ``ef`` candidates per query);
* hamming (packed binary codes): ``flat`` or ``ivf`` (faiss binary IVF).

Ids are the images' stable ids (``features.h5`` ``ids``), kept by ``IndexIDMap2`` / the IVF lists. HNSW cannot
delete: removed ids are kept as tombstones (filtered at search with an ``IDSelector``) until ``compact``.
Scores are similarities, higher is better: the inner product of unit vectors, or ``1 - hamming / bits``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import CbirError
from .faiss_index import FaissSearch, l2_normalise
from .atomic import write_faiss

CODECS = ("float32", "float16", "sq8", "pq")
ANNS = ("flat", "hnsw", "ivf")
#: galleries under this many images get an exact flat scan with ``ann="auto"``
AUTO_FLAT_BELOW = 50_000


def _faiss():
    import faiss

    return faiss


@dataclass
class SearchSpec:
    """How a gallery's vectors are searched; recorded in the manifest (``search``)."""

    metric: str = "cosine"
    dim_in: int = 0  # descriptor dimension (cosine) or code bits (hamming)
    dim: Optional[int] = None  # PCA-whitened dimension (cosine), None: as extracted
    # eigenvalues ** (-0.5 * power): 0 = plain PCA projection (default: corel1k P@10 0.972 at 256-d + PQ64, against 0.951
    # with power 0.5 and 0.972 exact), 0.5 = shrunk whitening (cirtorch, revisitop), 1 = full whitening
    whiten_power: float = 0.0
    # False: the PCA projection without its mean offset (x @ eigenvectors). Inner products of the projected vectors then
    # approximate those of the descriptors; centred projections rank by the cosine of centred vectors, another similarity
    # (benchmarks/scale.py, 60k synthetic fused descriptors, exact ranking in the reduced space: recall@10 against exact
    # 1536-d search 0.81 centred vs 0.94 uncentred at 256-d, 0.83 vs 0.98 at 512-d)
    pca_centre: bool = True
    codec: str = "float32"
    code_bytes: Optional[int] = None  # pq: bytes per vector (= sub-quantisers of 8 bits)
    ann: str = "flat"
    nlist: Optional[int] = None
    nprobe: int = 16
    ef: int = 128
    hnsw_m: int = 32
    removed: List[int] = field(default_factory=list)  # hnsw tombstones

    def __post_init__(self) -> None:
        if self.metric not in ("cosine", "hamming"):
            raise CbirError(f"unknown metric {self.metric!r}")
        if self.codec not in CODECS:
            raise CbirError(f"unknown --codec {self.codec!r}: choose one of {', '.join(CODECS)}")
        if self.ann not in ANNS:
            raise CbirError(f"unknown --ann {self.ann!r}: choose one of auto, {', '.join(ANNS)}")
        if self.metric == "hamming":
            if self.codec != "float32" or self.dim:
                raise CbirError("binary codes are searched as they are: --codec and --dim apply to float descriptors")
            if self.ann == "hnsw":
                raise CbirError("a Hamming index is flat or ivf (faiss has no binary HNSW with removal)")
        if self.dim is not None and not 1 <= self.dim <= self.dim_in:
            raise CbirError(f"--dim {self.dim}: must be between 1 and the descriptor's {self.dim_in} dimensions")
        d = self.search_dim
        if self.codec == "pq":
            if not self.code_bytes:
                raise CbirError("--codec pq needs --code-bytes N (e.g. 64)")
            if d % self.code_bytes:
                raise CbirError(f"--code-bytes {self.code_bytes} must divide the searched dimension {d} (PQ splits it in equal parts)")
        elif self.code_bytes:
            raise CbirError(f"--code-bytes goes with --codec pq, not {self.codec}")

    @property
    def search_dim(self) -> int:
        return int(self.dim or self.dim_in)

    @property
    def bytes_per_image(self) -> float:
        """Bytes each image adds to the search structure: its code and its 8-byte id (+ HNSW links)."""
        if self.metric == "hamming":
            code = self.dim_in // 8
        else:
            code = {"float32": 4 * self.search_dim, "float16": 2 * self.search_dim, "sq8": self.search_dim,
                    "pq": self.code_bytes or 0}[self.codec]
        links = 2 * self.hnsw_m * 4 if self.ann == "hnsw" else 0  # level-0 neighbour list of int32
        return float(code + 8 + links)

    def to_json(self) -> Dict[str, Any]:
        d = asdict(self)
        d["bytes_per_image"] = self.bytes_per_image
        return d

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "SearchSpec":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def auto_spec(metric: str, dim_in: int, n: int, ann: str = "auto", codec: Optional[str] = None, dim: Optional[int] = None,
              code_bytes: Optional[int] = None, memory_budget: Optional[float] = None, nlist: Optional[int] = None,
              whiten_power: float = 0.0, pca_centre: bool = True) -> SearchSpec:
    """Fill what the user left open. ``ann="auto"``: exact flat below :data:`AUTO_FLAT_BELOW` images, else IVF with
    ~4 sqrt(N) lists and, for floats, an uncentred PCA to 512-d + 8-bit scalar codes (520 bytes per image), or when
    ``memory_budget`` (bytes) is smaller, PCA to 256-d + PQ codes as large as it allows.

    Why uncentred 512-d SQ8 (benchmarks/results/scale.json, 200k synthetic fused descriptors, nprobe 16, 2 threads):
    recall@10 against exact float32 search 0.969 at 520 bytes, 0.23 ms per query; the previous default, centred
    PCA-256 + PQ64 (72 bytes, still chosen under a tight ``memory_budget``), 0.556 at any nprobe; centred PCA-256
    float16 (520 bytes) 0.794, uncentred 0.938. nprobe 16 (of 2048 lists): 0.965 at 4, 0.970 at 64."""
    if ann == "auto":
        ann = "flat" if n < AUTO_FLAT_BELOW else "ivf"
        if ann == "ivf" and metric == "cosine" and codec is None:
            sq_dim = dim or min(dim_in, 512)
            if not memory_budget or memory_budget / max(1, n) >= sq_dim + 8:
                dim, codec, pca_centre = sq_dim, "sq8", False
            else:
                dim = dim or min(dim_in, 256)
                per = (memory_budget / max(1, n)) - 8
                fits = [b for b in (128, 64, 32, 16, 8) if b <= per and (dim % b) == 0]
                if not fits:
                    raise CbirError(f"--memory-budget {memory_budget:.0f} bytes leaves {per:.0f} bytes per image: too little even for 8-byte codes")
                codec, code_bytes = "pq", code_bytes or fits[0]
    if ann == "ivf" and nlist is None:
        nlist = int(2 ** round(math.log2(max(1.0, 4 * math.sqrt(max(1, n))))))
    if whiten_power and not dim:
        raise CbirError("--whiten goes with --dim D (the PCA it whitens)")
    return SearchSpec(metric=metric, dim_in=dim_in, dim=dim, whiten_power=float(whiten_power or 0.0), pca_centre=pca_centre,
                      codec=codec or "float32",
                      code_bytes=code_bytes, ann=ann, nlist=nlist)


class FaissBackend(FaissSearch):
    """A gallery's search structure (see the module doc); ids are int64 image ids."""

    def __init__(self, spec: SearchSpec, index=None) -> None:
        faiss = _faiss()
        self.spec = spec
        if index is None:
            index = self._make(spec)
        super().__init__(index, spec.dim_in)
        self.metric = spec.metric
        self._removed = np.asarray(sorted(set(int(i) for i in spec.removed)), np.int64)
        self._faiss = faiss

    # -- construction
    @staticmethod
    def factory_string(spec: SearchSpec) -> str:
        """The faiss ``index_factory`` description of a cosine spec (IDMap2 gives flat and HNSW indexes ids)."""
        parts = [f"PCA{spec.dim}", "L2norm"] if spec.dim and spec.dim < spec.dim_in else []
        codec = {"float32": "Flat", "float16": "SQfp16", "sq8": "SQ8", "pq": f"PQ{spec.code_bytes}np"}[spec.codec]  # np: no polysemous training
        if spec.ann == "ivf":
            return ",".join(parts + [f"IVF{int(spec.nlist or 64)}", codec])
        if spec.ann == "hnsw":
            if spec.codec in ("pq", "sq8"):
                raise CbirError("--ann hnsw stores float32 or float16 vectors; use --ann ivf or flat with --codec pq")
            return ",".join(["IDMap2"] + parts + [f"HNSW{spec.hnsw_m}" + ("_SQfp16" if spec.codec == "float16" else ",Flat")])
        return ",".join(["IDMap2"] + parts + [codec])

    @classmethod
    def _make(cls, spec: SearchSpec):
        faiss = _faiss()
        if spec.metric == "hamming":
            if spec.ann == "ivf":
                ivf = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(spec.dim_in), spec.dim_in, int(spec.nlist or 64))
                ivf.nprobe = spec.nprobe
                ivf.cp.min_points_per_centroid = 1
                return ivf
            return faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(spec.dim_in))
        index = faiss.index_factory(spec.dim_in, cls.factory_string(spec), faiss.METRIC_INNER_PRODUCT)
        for sub in _walk(index):
            if isinstance(sub, faiss.IndexPreTransform):
                pca = faiss.downcast_VectorTransform(sub.chain.at(0))
                if isinstance(pca, faiss.PCAMatrix):
                    pca.eigen_power = -0.5 * spec.whiten_power
            if hasattr(sub, "do_polysemous_training"):
                sub.do_polysemous_training = False  # the factory's default: 40x the training time, and unused here
            if isinstance(sub, faiss.IndexIVF):
                sub.nprobe = spec.nprobe
                sub.cp.min_points_per_centroid = 1  # small galleries: faiss would print a warning per training call
            pq = getattr(sub, "pq", None)
            if pq is not None:
                pq.cp.min_points_per_centroid = 1
            if isinstance(sub, faiss.IndexHNSW):
                sub.hnsw.efSearch = spec.ef
                sub.hnsw.efConstruction = max(40, 2 * spec.hnsw_m)
        return index

    @property
    def is_trained(self) -> bool:
        return bool(self.index.is_trained)

    def train(self, sample: np.ndarray) -> None:
        """Learn the PCA, PQ codebooks and IVF centroids on a sample of the gallery (rows in any order)."""
        if self.is_trained:
            return
        x = self._prep(sample)
        sp, n = self.spec, len(x)
        if sp.ann == "ivf" and n < int(sp.nlist or 64):
            raise CbirError(f"--ann ivf with {sp.nlist} lists needs at least as many images to learn them, the gallery has {n}; "
                            "lower --nlist or use --ann flat")
        if sp.codec == "pq" and n < 256:
            raise CbirError(f"--codec pq learns 256 centroids per sub-vector: it needs at least 256 images, the gallery has {n}; "
                            "use --codec float16 for a small gallery")
        if sp.dim and sp.dim < sp.dim_in and n < sp.dim:
            raise CbirError(f"--dim {sp.dim}: PCA needs at least {sp.dim} images to learn, the gallery has {n}")
        if not sp.pca_centre and sp.dim and sp.dim < sp.dim_in:
            faiss = self._faiss
            pre = next(s for s in _walk(self.index) if isinstance(s, faiss.IndexPreTransform))
            pca = faiss.downcast_VectorTransform(pre.chain.at(0))
            pca.train(x)
            faiss.copy_array_to_vector(np.zeros(pca.d_out, np.float32), pca.b)  # x @ A.T, no mean offset
        self.index.train(x)  # a trained transform is kept as it is

    def _prep(self, x: np.ndarray) -> np.ndarray:
        if self.metric == "hamming":
            return np.ascontiguousarray(x, dtype=np.uint8)
        return l2_normalise(x)

    # -- the interface
    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if len(ids) != len(vectors):
            raise CbirError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        self._check(np.asarray(vectors))
        if not self.is_trained:
            raise CbirError("the index is not trained yet (train on a sample of the gallery first)")
        self.index.add_with_ids(self._prep(vectors), ids)

    def remove(self, ids: Sequence[int]) -> int:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        if self.spec.ann == "hnsw":  # no deletion in faiss HNSW: tombstones, filtered at search, dropped by compact
            self._removed = np.union1d(self._removed, ids)
            self.spec.removed = self._removed.tolist()
            return len(ids)
        return int(self.index.remove_ids(self._faiss.IDSelectorBatch(len(ids), self._faiss.swig_ptr(ids))))

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal) - len(self._removed)

    def _raw_search(self, q: np.ndarray, k: int):
        faiss = self._faiss
        q = self._prep(q)
        params = None
        if self.spec.ann == "hnsw":
            kw = {"efSearch": max(self.spec.ef, k)}
            if len(self._removed):
                self._sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(len(self._removed), faiss.swig_ptr(self._removed)))
                kw["sel"] = self._sel
            params = faiss.SearchParametersHNSW(**kw)
        s, i = (self.index.search(q, k, params=params) if params is not None else self.index.search(q, k))
        if self.metric == "hamming":
            s = np.where(i >= 0, 1.0 - s.astype(np.float32) / self.dim, 0.0).astype(np.float32)
        return s, i

    def set_search(self, nprobe: Optional[int] = None, ef: Optional[int] = None) -> None:
        """Query-time speed/recall: IVF lists visited (``nprobe``), HNSW candidates (``ef``)."""
        faiss = self._faiss
        if nprobe is not None:
            self.spec.nprobe = int(nprobe)
        if ef is not None:
            self.spec.ef = int(ef)
        for sub in _walk(self.index):
            if isinstance(sub, (faiss.IndexIVF, faiss.IndexBinaryIVF)):
                sub.nprobe = self.spec.nprobe
            if isinstance(sub, faiss.IndexHNSW):
                sub.hnsw.efSearch = self.spec.ef

    def _ivf(self):
        faiss = self._faiss
        return next((s for s in _walk(self.index) if isinstance(s, (faiss.IndexIVF, faiss.IndexBinaryIVF))), None)

    def save(self, path: os.PathLike) -> None:
        write_faiss(self.index, path, binary=self.metric == "hamming")

    @classmethod
    def open(cls, path: os.PathLike, spec: SearchSpec, mmap: bool = False) -> "FaissBackend":
        """Read a saved backend; ``mmap`` maps the file instead of copying it (flat and IVF codes)."""
        faiss = _faiss()
        if spec.metric == "hamming":
            index = faiss.read_index_binary(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        else:
            index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP if mmap else 0)
        b = cls(spec, index=index)
        b.set_search(nprobe=spec.nprobe, ef=spec.ef)
        return b

    def ids(self) -> np.ndarray:
        """Every stored id (tombstones excluded), sorted."""
        faiss = self._faiss
        idmap = next((x for x in _walk(self.index) if hasattr(x, "id_map")), None)
        if idmap is not None:
            out = faiss.vector_to_array(idmap.id_map)
        else:
            ivf = self._ivf()
            invl = ivf.invlists
            out = np.concatenate([faiss.rev_swig_ptr(invl.get_ids(l), invl.list_size(l)).copy() for l in range(ivf.nlist)]
                                 + [np.zeros(0, np.int64)])
        out = np.sort(out.astype(np.int64))
        return np.setdiff1d(out, self._removed) if len(self._removed) else out


def _walk(index):
    """``index`` and the indexes it wraps (IDMap, PreTransform, IVF quantiser not included), downcast."""
    import faiss

    seen = 0
    while index is not None and seen < 8:
        index = faiss.downcast_index(index) if not isinstance(index, faiss.IndexBinary) else faiss.downcast_IndexBinary(index)
        yield index
        index = getattr(index, "index", None) if isinstance(index, (faiss.IndexPreTransform, faiss.IndexIDMap, faiss.IndexIDMap2,
                                                                     faiss.IndexBinaryIDMap, faiss.IndexBinaryIDMap2)) else None
        seen += 1


def index_summary(m: Dict[str, Any], folder: os.PathLike) -> Dict[str, Any]:
    """What ``cbir index info --json`` leads with: sizes of the search structure and of the files."""
    if m.get("search"):
        spec = SearchSpec.from_json(m["search"])
    else:  # before codecs: flat float32 or flat binary, no ids stored in faiss
        spec = SearchSpec(metric=m["metric"], dim_in=m["code_bits"] if m["metric"] == "hamming" else m["dim"], ann=m.get("ann", "flat"))
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    return {"index": str(folder), "count": m["count"], "dim": m["dim"], "searched_dim": spec.search_dim if spec.metric == "cosine" else None,
            "metric": m["metric"], "codec": spec.codec if spec.metric == "cosine" else "binary", "ann": spec.ann,
            "bytes_per_image": spec.bytes_per_image, "file_bytes": files, "total_bytes": sum(files.values()),
            "store": m.get("store") or {"kind": "faiss", "file": m.get("faiss")}}
