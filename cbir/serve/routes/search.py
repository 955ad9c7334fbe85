"""POST /search (an uploaded image) and GET /search/similar/NAME ("more like this"): rank the gallery, optionally
re-ranked by local features, filtered by label, through the index's graph stage or the one asked for."""

# no `from __future__ import annotations`: FastAPI reads the route annotations
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
from fastapi import APIRouter, Depends, File, Query, Request, UploadFile

from ...errors import CbirError
from ...query import Ranking, UnknownLabel
from ..deps import LoadedDep, ServiceDep, deadline_left, decode_upload, gallery_path, gallery_row, only_files, read_upload
from ..errors import ApiError, clip
from ..service import Service, rerank_matcher
from ..state import Loaded

router = APIRouter()


@dataclass
class SearchOptions:
    top_k: int
    rerank: Optional[str]
    rerank_top: int
    label: Optional[str]
    expand: Any  # the graph stage: "index", None or a spec (cbir/index/expansion.py)


def search_options(request: Request, top_k: int = Query(10, ge=1, description="results to return (at most the service's --max-top-k)"),
                   rerank: Optional[str] = Query(None, description="re-rank the top candidates by geometric verification: a matcher "
                                                 "name (lighterglue, lightglue, mnn...) or true for the one that fits the index's local features"),
                   rerank_top: Optional[int] = Query(None, ge=1, le=1000, description="candidates verified when re-ranking "
                                                     "(default: the service's --rerank-top)"),
                   label: Optional[str] = Query(None, description="only results with this label"),
                   expand: Optional[bool] = Query(None, description="the graph stage: unset, the index's own (as `cbir query`); "
                                                  "false, plain top-k; true, alpha query expansion (cosine indexes)"),
                   qe_k: Optional[int] = Query(None, ge=1, le=50, description="results averaged into the query (implies expand)")) -> SearchOptions:
    cfg = request.app.state.service.cfg
    if top_k > cfg.max_top_k:
        raise ApiError(422, f"query field 'top_k': Input should be less than or equal to {cfg.max_top_k}")
    return SearchOptions(top_k, rerank, cfg.rerank_top if rerank_top is None else rerank_top, label, expand_conf(expand, qe_k))


def expand_conf(expand: Optional[bool], qe_k: Optional[int]) -> Any:
    """The graph stage of a request: the index's own (as `cbir query` does) unless the request asks otherwise:
    ``expand=false`` plain top-k, ``expand=true`` / ``qe_k`` alpha-QE with that many results."""
    if expand is None and not qe_k:
        return "index"
    if expand is False and not qe_k:
        return None
    from ...index.expansion import DEFAULT_ALPHA, DEFAULT_QE_K

    return {"qe_k": int(qe_k or DEFAULT_QE_K), "alpha": DEFAULT_ALPHA, "dba_k": 0}


def label_keep(loaded: Loaded, label: Optional[str]):
    """The index's row filter for ``label`` (None: none); 400 naming the labels it has when no image has it."""
    try:
        return loaded.index.label_filter(label)
    except UnknownLabel as e:
        some = e.known[:10]
        raise ApiError(400, f"no image of index {loaded.name!r} has label {clip(label)!r}; labels: "
                            f"{', '.join(some) if some else '(none: the index has no labels)'}" + (" ..." if len(e.known) > 10 else "")) from None


def check_options(loaded: Loaded, opts: SearchOptions) -> None:
    """A bad re-ranker or label is refused before any work."""
    rerank_matcher(loaded, opts.rerank)
    label_keep(loaded, opts.label)


def results_json(service: Service, loaded: Loaded, ranking: Ranking) -> List[Dict[str, Any]]:
    out = []
    for rank, (r, s) in enumerate(ranking.pairs, 1):
        res = loaded.index.result(r, s, rank)
        res.pop("path", None)  # the server's file system is nobody's business
        res.update(service.urls(loaded, res["name"]))
        inl = ranking.inliers
        if inl is not None and r in inl and inl[r] >= 0:  # as `cbir query --rerank` reports them
            res["inliers"] = int(inl[r])
            res["verified"] = bool(ranking.verified[r])
        out.append(res)
    return out


def search_with(request: Request, service: Service, loaded: Loaded, vec: np.ndarray, opts: SearchOptions,
                query_of: Callable[[Any], Any], exclude: Optional[int], seconds: Dict[str, float]):
    """(results, the re-ranking's summary or None) for one query vector; ``query_of(reranker)`` gives the re-ranker's
    query (an image in its frame, or its stored features). Re-ranking runs in the heavy-work gate."""
    keep = label_keep(loaded, opts.label)
    matcher = rerank_matcher(loaded, opts.rerank)
    idx = loaded.index
    try:
        search = loaded.searcher(opts.expand)
    except CbirError as e:
        raise ApiError(400, str(e)) from None
    t = time.perf_counter()
    if matcher is None:
        ranking = Ranking(idx.ranked(vec, opts.top_k, keep, exclude, search))
        seconds["search"] = time.perf_counter() - t
        return results_json(service, loaded, ranking), None
    cands = idx.ranked(vec, max(opts.top_k, opts.rerank_top), keep, exclude, search)
    seconds["search"] = time.perf_counter() - t
    reranker = loaded.reranker(matcher)

    def work():
        t0 = time.perf_counter()
        out = idx.reranked(vec, cands, reranker, query_of(reranker), opts.top_k, opts.rerank_top, keep, exclude, search)
        seconds["rerank"] = time.perf_counter() - t0
        return out

    ranking = service.gate.run(work, deadline_left(request), "re-ranking")
    return results_json(service, loaded, ranking), {"matcher": matcher, "features": loaded.local_features, "top": opts.rerank_top,
                                                    "min_inliers": int(reranker.conf["min_inliers"])}


def finish(seconds: Dict[str, float], t0: float) -> Dict[str, float]:
    seconds["total"] = time.perf_counter() - t0
    return {k: round(v, 4) for k, v in seconds.items()}


def check_vector(vec: np.ndarray, label: str) -> None:
    if vec.dtype.kind == "f":
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm < 1e-12:
            raise ApiError(422, f"{label}: the image gives no usable descriptor (blank or featureless?)")


def duplicate_of(service: Service, loaded: Loaded, vec: np.ndarray) -> Optional[Dict[str, Any]]:
    """The gallery image an upload is a near duplicate of: its nearest neighbour when their descriptor similarity reaches
    the threshold measured for the index's extractor (cbir/duplicates.py, descriptors alone); None otherwise."""
    from ...duplicates import THRESHOLDS

    t = THRESHOLDS.get(loaded.index.extractor_name)
    if t is None or not len(loaded.index):
        return None
    scores, rows = loaded.index.search(np.asarray(vec).reshape(1, -1), 1)
    if rows[0, 0] < 0 or float(scores[0, 0]) < t:
        return None
    name = str(loaded.index.names[int(rows[0, 0])])
    return {"name": name, "score": round(float(scores[0, 0]), 6), "threshold": t, **service.urls(loaded, name)}


@router.post("/search", summary="rank the gallery for an uploaded image", dependencies=[Depends(only_files("image"))])
def search(request: Request, service: ServiceDep, loaded: LoadedDep,
           image: Optional[UploadFile] = File(None, description="the query image (any format PIL reads)"),
           opts: SearchOptions = Depends(search_options)):
    t0 = time.perf_counter()
    seconds: Dict[str, float] = {}
    data, name = read_upload(image, "image", request)
    check_options(loaded, opts)
    img = decode_upload(data, name, loaded.index.extractor.max_side)
    seconds["decode"] = time.perf_counter() - t0
    vec, job = service.batcher.describe(loaded, img, deadline_left(request))
    seconds["queue"] = max(0.0, job.started_at - job.queued_at)
    seconds["extract"] = job.extract_s
    check_vector(vec, name)
    results, rr = search_with(request, service, loaded, vec, opts, lambda rer: decode_upload(data, name, rer.query_side), None, seconds)
    out = {"index": loaded.name, "query": {"name": image.filename, "described_size": [int(img.shape[1]), int(img.shape[0])]},
           "results": results, "batch": job.batch, "seconds": finish(seconds, t0)}
    if rr:
        out["rerank"] = rr
    dup = duplicate_of(service, loaded, vec)
    if dup:
        out["duplicate_of"] = dup
    return out


@router.get("/search/similar/{name:path}", summary="more like this: rank the gallery for one of its own images")
def similar(request: Request, name: str, service: ServiceDep, loaded: LoadedDep, opts: SearchOptions = Depends(search_options)):
    from ...data import Entry

    t0 = time.perf_counter()
    row = gallery_row(loaded, name)
    seconds: Dict[str, float] = {}
    vec = loaded.index.query_vectors(np.array([row]))
    query_of = lambda rer: rer.query_item(Entry(name, gallery_path(loaded, row), None))  # noqa: E731 - its stored features
    results, rr = search_with(request, service, loaded, vec, opts, query_of, row, seconds)
    q = loaded.index.result(row, 1.0, 0)
    out = {"index": loaded.name, "query": {"name": name, "label": q["label"], "label_name": q["label_name"], **service.urls(loaded, name)},
           "results": results, "seconds": finish(seconds, t0)}
    if rr:
        out["rerank"] = rr
    return out
