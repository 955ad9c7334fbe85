"""The evaluation stage: rank the gallery for labelled queries and report P@k, AP@k, mAP, N-S and PR curves.

    report = evaluate("indexes/corel1k", dataset="corel1k")
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..data import Entry, iter_decoded, load_dataset
from ..errors import CbirError, DecodeError
from ..progress import bar as _progress, log as _log
from ..query import Index

PathLike = Union[str, os.PathLike]


def _query_entries(index: Index, dataset: Optional[str], split: Optional[str], queries: Optional[PathLike],
                   root: Optional[PathLike], datasets_yaml: Optional[PathLike], labels: Optional[str] = None) -> Tuple[List[Entry], str]:
    if queries is not None:  # a file list or a folder (cbir/folders.py)
        from ..folders import read_images

        entries = read_images(queries, root=root, labels=labels)
        if labels is not None and any(e.label is None for e in entries):  # images directly in the folder: no label, no query
            _log(f"note: {sum(e.label is None for e in entries)} image(s) outside the sub-folders have no label and do not query")
            entries = [e for e in entries if e.label is not None]
        return entries, str(queries)
    if dataset is not None:
        ds = load_dataset(dataset, split=split, datasets_yaml=datasets_yaml)
        return (ds.queries if ds.queries is not None else ds.gallery), dataset
    # no query set named: every gallery image queries the rest
    return [Entry(str(n), Path(p), l) for n, p, l in zip(index.names, index.paths, index.labels)], "index"


def _check_inputs(idx: Index, q_entries: List[Entry], source: str, ks: Sequence[int], max_rank: Optional[int]) -> None:
    """Refuse what cannot be evaluated: an unlabelled gallery or query, bad cut-offs, an empty query set."""
    if all(l is None for l in idx.labels):
        raise CbirError(f"{idx.folder}: the gallery has no labels; build it from a labelled list to evaluate")
    if any(e.label is None for e in q_entries):
        raise CbirError("every query needs a label to be evaluated (the list has unlabelled entries)")
    if ks is None or not len(ks) or any(int(k) < 1 for k in ks):
        raise CbirError(f"cut-offs k must be positive integers, got {list(ks or [])}")
    if max_rank is not None and int(max_rank) < 1:
        raise CbirError(f"max_rank must be a positive number of results, got {max_rank}")
    if not q_entries:
        raise CbirError(f"no query to evaluate: {source} lists none")


@dataclass
class _Relevance:
    """Who is relevant to whom: the gallery's labels, each query's gallery row (-1: not a gallery image) and its
    number of relevant gallery items (itself left out), the queries without any."""

    gl: np.ndarray  # gallery labels as str ("" for none)
    counts: Dict[str, int]  # gallery images per label
    rows: np.ndarray  # the gallery row of each query, -1 when it is not a gallery image
    n_rel: np.ndarray  # relevant gallery items of each query
    no_rel: np.ndarray  # positions of the queries without any
    without_relevant: List[Dict[str, str]]  # the first 10 of them: {"name", "label"}


def _relevance(idx: Index, q_entries: List[Entry]) -> _Relevance:
    """The relevant gallery items of each query (itself left out when it is a gallery image of the same label);
    queries without any cannot be scored: counted apart, left out of the metrics, named in the report (a warning),
    and when no query has any a :class:`CbirError`. A query is a gallery image by its name, or by its file (an index
    built before list names were normalised)."""
    from ..cliutil import tty_safe

    gl = np.array(["" if l is None else str(l) for l in idx.labels], dtype=object)
    counts: Dict[str, int] = {}
    for l in gl:
        counts[l] = counts.get(l, 0) + 1
    rows = np.array([r if r is not None else -1 for r in ((idx.row(e.name) if idx.row(e.name) is not None else idx.row_of_path(e.path))
                                                         for e in q_entries)])
    n_rel_all = np.array([counts.get(str(e.label), 0) - (1 if r >= 0 and gl[r] == str(e.label) else 0)
                          for e, r in zip(q_entries, rows)], dtype=np.int64)
    no_rel = np.flatnonzero(n_rel_all <= 0)
    without_relevant = [{"name": q_entries[i].name, "label": str(q_entries[i].label)} for i in no_rel[:10]]
    if len(no_rel):
        e0 = q_entries[no_rel[0]]
        why = "its label is not in the gallery" if counts.get(str(e0.label), 0) == 0 else "no other gallery image has its label"
        if len(no_rel) == len(q_entries):
            named = sorted(l for l in counts if l)
            shown = ", ".join(repr(l) for l in named[:5]) + (", ..." if len(named) > 5 else "")
            raise CbirError(f"no query can be evaluated: none of the {len(q_entries)} queries has a relevant image in the gallery, "
                            f"e.g. {e0.name!r} with label {str(e0.label)!r} ({why}); gallery labels: {shown}")
        _log(f"warning: {len(no_rel)} of {len(q_entries)} queries have no relevant image in the gallery and are left out of "
             f"the metrics, e.g. {tty_safe(e0.name)} (label {str(e0.label)!r}: {why})")
    return _Relevance(gl, counts, rows, n_rel_all, no_rel, without_relevant)


def _query_vectors(idx: Index, q_entries: List[Entry], rel: _Relevance, progress: bool,
                   workers: int) -> Tuple[np.ndarray, np.ndarray, List[Dict[str, str]]]:
    """The search vector of each query: the stored row for a gallery image, extracted otherwise (only for queries
    with relevant items). Returns ``(vectors, readable, failures)``: ``readable[i]`` False for an unreadable query,
    each failure ``{"path", "cause"}``."""
    from ..cliutil import tty_safe

    rows = rel.rows
    ext_needed = [i for i, r in enumerate(rows) if r < 0 and rel.n_rel[i] > 0]
    m = idx.manifest
    dim_vec = m["code_bits"] // 8 if idx.metric == "hamming" else m["dim"]
    qvec = np.zeros((len(q_entries), dim_vec), dtype=np.uint8 if idx.metric == "hamming" else np.float32)
    qfinal = np.zeros((len(q_entries), m["dim"]), np.float32)
    in_gal = rows >= 0
    if in_gal.any():
        qvec[in_gal] = idx.query_vectors(rows[in_gal])
        qfinal[in_gal] = idx.descriptor_rows(rows[in_gal])
    failures = []
    keep = np.ones(len(q_entries), bool)
    if ext_needed:
        ext = idx.extractor
        sub = [q_entries[i] for i in ext_needed]
        pb = _progress(total=len(sub), desc="extract queries", enabled=progress)
        for j, e, img in iter_decoded(sub, ext.max_side, workers=workers):
            i = ext_needed[j]
            if isinstance(img, DecodeError):
                failures.append({"path": str(e.path), "cause": img.cause})
                keep[i] = False
                _log(f"skipped query {tty_safe(e.path)}: {tty_safe(img.cause)}", pb)
            else:
                f, v = idx.describe_images([img])
                qfinal[i], qvec[i] = f[0], v[0]
            pb.update()
        pb.close()
    return qvec, keep, failures


@dataclass
class _Ranked:
    """What ranking the queries gave: the metrics (plain and re-ranked), the first 10 relevance flags of each query
    (for the seed scores), the graph stage and re-ranker used, and their seconds."""

    acc: Any
    acc_rr: Any
    seed_rel: List[np.ndarray]
    search: Any
    reranker: Any
    t_search: float
    t_rerank: float


def _rank_queries(idx: Index, q_entries: List[Entry], rel: _Relevance, qidx: np.ndarray, qvec: np.ndarray, K: int,
                  ks: Sequence[int], expand: Any, rerank: Optional[str], rerank_top: int,
                  rerank_conf: Optional[Dict[str, Any]], progress: bool) -> _Ranked:
    """Search (and re-rank) the scored queries ``qidx`` in blocks, each left out of its own ranking, accumulating
    the metrics; relevant = same label."""
    from .metrics import MetricAccumulator

    gl, rows, counts = rel.gl, rel.rows, rel.counts
    labels_q = np.array([str(q_entries[i].label) for i in qidx], dtype=object)
    n_rel = rel.n_rel[qidx]
    self_in_gallery = bool((rows[qidx] >= 0).all())
    with_ns = len(counts) > 0 and all(c == 4 for c in counts.values())
    acc = MetricAccumulator(ks, with_ns=with_ns, self_in_gallery=self_in_gallery)
    acc_rr = MetricAccumulator(ks, with_ns=with_ns, self_in_gallery=self_in_gallery) if rerank else None
    seed_rel = []
    t0 = time.time()
    t_rerank = 0.0
    reranker = None
    if rerank:
        from ..local.rerank import Reranker

        reranker = Reranker(idx, rerank, conf=rerank_conf or {})
    search = idx.searcher(expand)
    step = max(1, min(1024, (64 << 20) // max(1, 12 * K)))
    pb = _progress(total=len(qidx), desc="search", enabled=progress, unit="query")
    for a in range(0, len(qidx), step):
        sel = qidx[a : a + step]
        ex = rows[sel]
        s, ids = search(qvec[sel], K, exclude=np.where(ex >= 0, ex, -1))
        rel_block = (gl[np.maximum(ids, 0)] == labels_q[a : a + step, None]) & (ids >= 0)
        acc.update(rel_block, n_rel[a : a + step])
        seed_rel.append(rel_block[:, :10])
        if reranker is not None:
            t1 = time.time()
            ids_rr = np.stack([reranker.expand_verified(reranker.rerank(q_entries[i], ids[j], s[j], top=rerank_top), qvec[i], search, K,
                                                        exclude=int(rows[i])) for j, i in enumerate(sel)])
            t_rerank += time.time() - t1
            rel_rr = (gl[np.maximum(ids_rr, 0)] == labels_q[a : a + step, None]) & (ids_rr >= 0)
            acc_rr.update(rel_rr, n_rel[a : a + step])
        pb.update(len(sel))
    pb.close()
    t_search = time.time() - t0 - t_rerank
    return _Ranked(acc, acc_rr, seed_rel, search, reranker, t_search, t_rerank)


def _curve(values) -> List[Optional[float]]:
    """A PR curve for JSON, which has no NaN: an undefined point is null."""
    from .metrics import finite_or_none

    return [None if finite_or_none(x) is None else round(float(x), 4) for x in values]


def _report(idx: Index, source: str, split: Optional[str], q_entries: List[Entry], rel: _Relevance, qidx: np.ndarray,
            failures: List[Dict[str, str]], K: int, ranked: _Ranked, rerank: Optional[str], rerank_top: int,
            t_extract: float, t_start: float) -> Dict[str, Any]:
    from .metrics import seed_scores

    nq = len(qidx)
    acc, acc_rr = ranked.acc, ranked.acc_rr
    report: Dict[str, Any] = {
        "dataset": source,
        "split": split,
        "index": str(idx.folder),
        "extractor": idx.extractor_name,
        "extractor_conf": idx.manifest["extractor"]["conf"],
        "metric": idx.metric,
        "gallery_size": len(idx),
        # n_queries: the queries the metrics are means over; the others are counted apart
        "n_queries": nq,
        "n_queries_listed": len(q_entries),
        "n_queries_without_relevant": int(len(rel.no_rel)),
        "queries_without_relevant": rel.without_relevant,  # the first 10: {"name", "label"}
        "n_query_failures": len(failures),
        "leave_one_out": bool((rel.rows[qidx] >= 0).all()),
        "max_rank": K,
        "expand": ranked.search.describe(),
        "metrics": acc.summary(),
        "seed_definition": seed_scores(np.concatenate(ranked.seed_rel)) if ranked.seed_rel else {},
        "pr_curve": {"recall": np.linspace(0, 1, 11).round(2).tolist(), "precision": _curve(acc.pr())},
        "seconds": {
            "extract_queries": round(t_extract, 3),
            "search": round(ranked.t_search, 3),
            "search_ms_per_query": round(1000 * ranked.t_search / max(1, nq), 3),
            "total": round(time.time() - t_start, 3),
        },
        "query_failures": failures,
    }
    if acc_rr is not None:
        report["metrics_rerank"] = acc_rr.summary()
        report["rerank"] = {"matcher": rerank, "top": rerank_top, **ranked.reranker.describe()}
        report["seconds"]["rerank"] = round(ranked.t_rerank, 3)
        report["seconds"]["rerank_s_per_query"] = round(ranked.t_rerank / max(1, nq), 4)
        report["pr_curve_rerank"] = _curve(acc_rr.pr())
    return report


def evaluate(
    index: Union[PathLike, Index],
    dataset: Optional[str] = None,
    split: Optional[str] = None,
    queries: Optional[PathLike] = None,
    root: Optional[PathLike] = None,
    ks: Sequence[int] = (1, 5, 10),
    rerank: Optional[str] = None,
    rerank_top: int = 100,
    rerank_conf: Optional[Dict[str, Any]] = None,
    max_rank: Optional[int] = None,
    datasets_yaml: Optional[PathLike] = None,
    progress: bool = True,
    workers: int = 2,
    plot: Optional[PathLike] = None,
    expand: Any = "index",
    labels: Optional[str] = None,
) -> Dict[str, Any]:
    """Rank the gallery for every query and report precision@k, AP@k, mAP (and N-S where groups have 4).

    Queries that are gallery images (same name) use their stored descriptor and are left out of their
    own ranking (leave-one-out); other queries are extracted. Relevant = same label.

    Queries without any relevant gallery image (a label the gallery lacks) cannot be scored: a warning names one,
    the report counts them apart (``n_queries_without_relevant``, the first 10 in ``queries_without_relevant``) and
    ``n_queries`` counts the queries the metrics are means over; unreadable queries are in ``query_failures``.
    An undefined metric is None, never NaN. Raises :class:`CbirError` when no query can be evaluated.
    ``expand``: the graph stage (cbir/index/expansion.py): ``"index"`` (what the index records, the default), None
    (plain top-k) or ``{"qe_k", "alpha", "dba_k", "diffusion"}``; leave-one-out is kept through every stage.
    ``queries`` may be a folder; ``labels="folder"`` then labels each query by its top-level sub-folder.

    The phases: the query set (``_query_entries``), its checks, who is relevant to whom (``_relevance``), the query
    vectors (``_query_vectors``), the ranking and its metrics (``_rank_queries``), the report (``_report``), the plot.
    """
    t_start = time.time()
    idx = index if isinstance(index, Index) else Index(index)
    q_entries, source = _query_entries(idx, dataset, split, queries, root, datasets_yaml, labels)
    _check_inputs(idx, q_entries, source, ks, max_rank)
    rel = _relevance(idx, q_entries)

    t0 = time.time()
    qvec, keep, failures = _query_vectors(idx, q_entries, rel, progress, workers)
    t_extract = time.time() - t0
    qidx = np.flatnonzero(keep & (rel.n_rel > 0))
    if not len(qidx):
        f0 = failures[0]
        raise CbirError(f"no query can be evaluated: the {len(failures)} queries with relevant gallery images could not be read, "
                        f"e.g. {f0['path']}: {f0['cause']}")
    n = len(idx)
    K = n if max_rank is None else min(n, max_rank)
    ranked = _rank_queries(idx, q_entries, rel, qidx, qvec, K, ks, expand, rerank, rerank_top, rerank_conf, progress)
    report = _report(idx, source, split, q_entries, rel, qidx, failures, K, ranked, rerank, rerank_top, t_extract, t_start)
    if plot:
        from .plots import pr_plot

        curves = {f"{idx.extractor_name} (mAP {report['metrics']['map']:.3f})": ranked.acc.pr()}
        if ranked.acc_rr is not None:
            curves[f"+ rerank {rerank} (mAP {report['metrics_rerank']['map']:.3f})"] = ranked.acc_rr.pr()
        pr_plot(curves, plot, title=f"{source}{'/' + split if split else ''}: {len(qidx)} queries, gallery {n}")
    return report
