"""What a Milvus store can take: a :class:`~cbir.index.backend.SearchSpec` checked against Lite or a server, chosen
for a new index (:func:`auto_store_spec`), and turned into Milvus index parameters (:func:`index_params`)."""

from __future__ import annotations

from typing import Any, Dict, Optional

from ...errors import CbirError
from ..backend import SearchSpec
from .connection import is_lite


def check_spec(spec: SearchSpec, uri: str) -> None:
    """Refuse, with the alternative named, what this Milvus (Lite or server) cannot store as ``spec`` asks."""
    lite = is_lite(uri)
    if spec.metric == "hamming" and lite:
        raise CbirError("Milvus Lite has no binary vectors: a Hamming index (--extractor hash) needs a Milvus server "
                        "(--store milvus:http://host:19530) or the faiss store (drop --store); float extractors work on Milvus Lite")
    if spec.codec == "pq" and lite:
        raise CbirError("Milvus Lite has no product quantisation (IVF_PQ): drop --codec pq (float32 or sq8 work on Milvus Lite), "
                        "use a Milvus server (--store milvus:http://host:19530) or the faiss store (drop --store)")
    if spec.codec == "float16":
        raise CbirError("--codec float16 is not available with --store milvus: use float32 or sq8 (or the faiss store)")
    if spec.dim and spec.dim < spec.dim_in:
        raise CbirError(f"--store milvus keeps the {spec.dim_in}-d descriptors as they are: a PCA to --dim {spec.dim} is only "
                        "available with the faiss store (drop --dim)")
    if spec.ann == "hnsw" and spec.codec == "pq":
        raise CbirError("--ann hnsw stores float32 or sq8 vectors; use --ann ivf or flat with --codec pq")
    if lite and (spec.ann != "flat" or spec.codec != "float32"):
        # pymilvus 3 sends index parameters (nlist, M, ...) flattened, milvus-lite 3.2 reads them from one JSON key: Lite
        # would build its own defaults (IVF: 128 lists, whatever --nlist says) and search them with the recall of those
        raise CbirError(f"Milvus Lite searches float32 vectors exactly (--ann flat): --ann {spec.ann} / --codec {spec.codec} "
                        "would not get their parameters there; drop them, use a Milvus server (--store milvus:http://host:19530) "
                        "or the faiss store")


def auto_store_spec(metric: str, dim_in: int, n: int, uri: str, ann: str = "auto", codec: Optional[str] = None,
                    code_bytes: Optional[int] = None, nlist: Optional[int] = None, memory_budget: Optional[float] = None,
                    dim: Optional[int] = None) -> SearchSpec:
    """What :func:`cbir.index.backend.auto_spec` chooses, for a Milvus store: never a PCA (Milvus keeps descriptors as
    they are), and on Milvus Lite an exact flat scan unless something else is asked (then refused, naming why)."""
    from ..backend import auto_spec

    if is_lite(uri) and ann in ("auto", "flat") and codec in (None, "float32") and not dim and not code_bytes:
        spec = SearchSpec(metric=metric, dim_in=int(dim_in))
    else:
        spec = auto_spec(metric, int(dim_in), int(n), ann=ann, codec=codec, dim=dim or (int(dim_in) if metric == "cosine" else None),
                         code_bytes=code_bytes, memory_budget=memory_budget, nlist=nlist)
        if spec.dim == spec.dim_in:
            spec.dim = None
    check_spec(spec, uri)
    return spec


def index_params(spec: SearchSpec) -> Dict[str, Any]:
    """``{"index_type", "metric_type", "params"}`` of the Milvus vector index for ``spec`` (see the module doc)."""
    nlist = int(spec.nlist or 64) if spec.ann == "ivf" else 1
    if spec.metric == "hamming":
        if spec.ann == "ivf":
            return {"index_type": "BIN_IVF_FLAT", "metric_type": "HAMMING", "params": {"nlist": nlist}}
        return {"index_type": "BIN_FLAT", "metric_type": "HAMMING", "params": {}}
    hnsw = {"M": int(spec.hnsw_m), "efConstruction": max(40, 2 * int(spec.hnsw_m))}
    if spec.codec == "pq":
        return {"index_type": "IVF_PQ", "metric_type": "IP", "params": {"nlist": nlist, "m": int(spec.code_bytes), "nbits": 8}}
    if spec.codec == "sq8":
        if spec.ann == "hnsw":
            return {"index_type": "HNSW_SQ", "metric_type": "IP", "params": {**hnsw, "sq_type": "SQ8"}}
        return {"index_type": "IVF_SQ8", "metric_type": "IP", "params": {"nlist": nlist}}  # flat sq8: one list, scanned whole
    if spec.ann == "ivf":
        return {"index_type": "IVF_FLAT", "metric_type": "IP", "params": {"nlist": nlist}}
    if spec.ann == "hnsw":
        return {"index_type": "HNSW", "metric_type": "IP", "params": hnsw}
    return {"index_type": "FLAT", "metric_type": "IP", "params": {}}
