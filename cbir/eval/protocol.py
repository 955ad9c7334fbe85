"""The Oxford5k / Paris6k protocols: query boxes, good/ok positives, junk removed from the ranking.

Two ground-truth forms (``cbir eval --gnd PATH``):

* **classic** (Philbin et al. 2007/2008), a folder of the official files: for each query ``NAME``,
  ``NAME_query.txt`` (``image x1 y1 x2 y2``: the query image and its box, in the image's pixels),
  ``NAME_good.txt``, ``NAME_ok.txt`` and ``NAME_junk.txt`` (image names without extension, one a line).
  Each query is its image cropped to the box; positives = good + ok; junk images are removed from the ranking
  before AP is computed (they count neither way). AP is cbir's (metrics.py): the mean of the precision at
  each positive's rank among the non-junk results, over the positives present in the gallery; ``ap_trapezoid``
  is the same ranking scored as the official compute_ap (trapezoidal rule). A query whose image is not in the
  gallery is skipped and counted.
* **revisited** (Radenovic et al., CVPR 2018), a JSON file in revisitop's layout: ``{"imlist": [names],
  "qimlist": [names], "gnd": [{"bbx": [x1, y1, x2, y2], "easy": [i...], "hard": [i...], "junk": [i...]}]}``
  (indices into ``imlist``; revisitop's gnd_*.pkl loaded and written with json.dump). The queries are not
  gallery images. Three setups: Easy (positives easy, junk junk + hard), Medium (easy + hard; junk) and
  Hard (hard; junk + easy), scored exactly as revisitop's ``compute_map``: trapezoidal AP over all positives
  of the ground truth, and its mP@k (precision at min(k, rank of the last positive)).

Gallery images are matched to ground-truth names by file stem (``paris_defense_000605`` for
``images/defense/paris_defense_000605.jpg``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..errors import CbirError, DecodeError

PathLike = Union[str, os.PathLike]

#: mP@k cut-offs of the revisited protocol (revisitop's ks)
REVISITED_KS = (1, 5, 10)
SETUPS = ("easy", "medium", "hard")


def stem(name: str) -> str:
    """``paris_defense_000605`` for ``images/defense/paris_defense_000605.jpg`` (the ground truth's names)."""
    base = os.path.basename(str(name))
    return base.rsplit(".", 1)[0] if "." in base else base


# -- ground truth ----------------------------------------------------------------------------------------------
def _names_file(path: Path) -> Set[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CbirError(f"{path}: ground-truth file not found (each query NAME needs NAME_good.txt, NAME_ok.txt and "
                        "NAME_junk.txt beside NAME_query.txt)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CbirError(f"{path}: cannot read the ground-truth file ({e})") from None
    return {stem(line.strip()) for line in text.splitlines() if line.strip()}


def read_classic(folder: PathLike) -> List[Dict[str, Any]]:
    """The queries of an official Oxford/Paris gt folder: ``{"gnd", "query", "box", "pos", "junk"}`` in name order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CbirError(f"{folder}: not a folder of Oxford/Paris ground-truth files (NAME_query.txt, NAME_good.txt, ...) "
                        "nor a revisited-protocol JSON file")
    out = []
    for q in sorted(folder.glob("*_query.txt")):
        name = q.name[: -len("_query.txt")]
        try:
            parts = q.read_text(encoding="utf-8").split()
        except (OSError, UnicodeDecodeError) as e:
            raise CbirError(f"{q}: cannot read the query file ({e})") from None
        try:
            box = [float(v) for v in parts[1:5]]
            if len(parts) < 5:
                raise ValueError
        except ValueError:
            raise CbirError(f"{q}: expected 'image x1 y1 x2 y2', got {' '.join(parts)[:80]!r}") from None
        good, ok, junk = (_names_file(folder / f"{name}_{s}.txt") for s in ("good", "ok", "junk"))
        out.append({"gnd": name, "query": stem(parts[0]), "box": box, "pos": good | ok, "junk": junk - (good | ok)})
    if not out:
        raise CbirError(f"{folder}: no NAME_query.txt file (not an Oxford/Paris ground-truth folder)")
    return out


def read_revisited(path: PathLike) -> Dict[str, Any]:
    """A revisited-protocol ground truth (JSON, revisitop's layout), checked: names, boxes and indices in range."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CbirError(f"{path}: ground-truth file not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CbirError(f"{path}: not a readable JSON ground truth ({e})") from None
    if not isinstance(d, dict) or not all(k in d for k in ("imlist", "qimlist", "gnd")):
        raise CbirError(f"{path}: a revisited ground truth needs 'imlist', 'qimlist' and 'gnd' (revisitop's layout)")
    im, qim, gnd = d["imlist"], d["qimlist"], d["gnd"]
    if not isinstance(gnd, list) or len(gnd) != len(qim):
        raise CbirError(f"{path}: 'gnd' must have one entry per query ({len(qim)}), has {len(gnd) if isinstance(gnd, list) else 'none'}")
    n = len(im)
    for i, g in enumerate(gnd):
        for key in ("easy", "hard", "junk"):
            v = g.get(key, [])
            if not isinstance(v, list) or any(isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < n for j in v):
                raise CbirError(f"{path}: gnd[{i}].{key} must list indices into imlist (0..{n - 1})")
        if g.get("bbx") is not None and len(g["bbx"]) != 4:
            raise CbirError(f"{path}: gnd[{i}].bbx must be [x1, y1, x2, y2]")
    return {"imlist": [stem(x) for x in im], "qimlist": [stem(x) for x in qim], "gnd": gnd}


def revisited_setup(gnd: Sequence[Dict[str, Any]], setup: str) -> List[Dict[str, np.ndarray]]:
    """revisitop's positives (``ok``) and junk per query for ``easy`` / ``medium`` / ``hard``."""
    out = []
    for g in gnd:
        e, h, j = (np.asarray(g.get(k, []), np.int64) for k in ("easy", "hard", "junk"))
        if setup == "easy":
            out.append({"ok": e, "junk": np.concatenate([j, h])})
        elif setup == "medium":
            out.append({"ok": np.concatenate([e, h]), "junk": j})
        elif setup == "hard":
            out.append({"ok": h, "junk": np.concatenate([j, e])})
        else:
            raise CbirError(f"unknown setup {setup!r}; choose one of {SETUPS}")
    return out


# -- scores ----------------------------------------------------------------------------------------------------
def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Trapezoidal AP of positives found at 0-based ``ranks`` (junk already taken out), ``nres`` positives in all."""
    ap = 0.0
    step = 1.0 / max(int(nres), 1)
    for j, r in enumerate(np.asarray(ranks, np.float64)):
        p0 = 1.0 if r == 0 else j / r
        p1 = (j + 1) / (r + 1)
        ap += (p0 + p1) * step / 2.0
    return ap


def _positions(ranking: np.ndarray, ok: np.ndarray, junk: np.ndarray) -> np.ndarray:
    """0-based ranks of the positives in ``ranking`` after the junk before each is taken out."""
    pos = np.flatnonzero(np.isin(ranking, ok))
    jpos = np.flatnonzero(np.isin(ranking, junk))
    return pos - np.searchsorted(jpos, pos)


def compute_map(ranks: np.ndarray, gnd: Sequence[Dict[str, np.ndarray]], kappas: Sequence[int] = ()) -> Dict[str, Any]:
    """revisitop's compute_map: ``ranks`` ``(n_images, n_queries)`` (gallery indices, best first, column per query).

    Returns ``{"map", "aps", "mp", "prs", "n_empty"}``; a query without positives has AP NaN and is left out
    of the means (as there).
    """
    ranks = np.asarray(ranks)
    nq = len(gnd)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"])
        if not len(ok):
            continue
        pos = _positions(ranks[:, i], ok, np.asarray(gnd[i].get("junk", [])))
        aps[i] = compute_ap(pos, len(ok))
        p1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(p1.max()), int(k)) if len(p1) else int(k)
            prs[i, j] = (p1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    n_valid = int(valid.sum())
    return {"map": float(aps[valid].mean()) if n_valid else None, "aps": aps,
            "mp": prs[valid].mean(0) if n_valid else np.full(len(kappas), np.nan), "prs": prs, "n_empty": nq - n_valid}


def plain_ap(ranking: Sequence[str], pos: Set[str], junk: Set[str], n_pos: int) -> float:
    """cbir's AP of one ranking (stems): mean precision at each positive among non-junk results, over ``n_pos``."""
    hits, s, k = 0, 0.0, 0
    for n in ranking:
        if n in junk:
            continue
        k += 1
        if n in pos:
            hits += 1
            s += hits / k
    return s / n_pos if n_pos else float("nan")


# -- evaluation of an index ------------------------------------------------------------------------------------
def _crop(img: np.ndarray, box: Sequence[float], scale: float = 1.0) -> np.ndarray:
    h, w = img.shape[:2]
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    a, b = int(np.clip(np.floor(min(x1, x2)), 0, w - 1)), int(np.clip(np.ceil(max(x1, x2)), 1, w))
    c, d = int(np.clip(np.floor(min(y1, y2)), 0, h - 1)), int(np.clip(np.ceil(max(y1, y2)), 1, h))
    return np.ascontiguousarray(img[c:max(d, c + 1), a:max(b, a + 1)])


def query_crop(path: PathLike, box: Optional[Sequence[float]], max_side: Optional[int]) -> np.ndarray:
    """The query image cropped to its box (in the stored image's pixels), then reduced to ``max_side``."""
    from ..data import decode_image, resize_max_side

    img = decode_image(path)
    if box is not None:
        img = _crop(img, box)
    return resize_max_side(img, max_side) if max_side else img


def _query_path(name: str, root: Optional[Path], row_of: Dict[str, int], paths) -> Optional[Path]:
    """The file of query image ``name``: ``root/NAME.jpg`` (or ``root/NAME``) when a folder is given, else the gallery's
    image of that stem; None when neither has it."""
    if root is not None:
        return next((p for p in (root / f"{name}.jpg", root / name) if p.is_file()), root / f"{name}.jpg")
    r = row_of.get(name)
    return None if r is None else Path(paths[r])


def _read_queries(gpath: Path, images: Optional[PathLike]):
    """The queries of a ground truth: ``(revisited ground truth or None, queries, folder of the query images or None)``;
    each query ``{"gnd", "query", "box"}`` (classic ones also ``"pos"``, ``"junk"``)."""
    if gpath.is_file():
        rv = read_revisited(gpath)
        queries = [{"gnd": f"q{i:03d}", "query": q, "box": g.get("bbx")} for i, (q, g) in enumerate(zip(rv["qimlist"], rv["gnd"]))]
        return rv, queries, (Path(images) if images else None)
    return None, read_classic(gpath), None


@dataclass
class _Run:
    """The queries that could be searched (``(query, report item)``), their rankings (gallery rows, best first; and
    re-ranked), the queries skipped (``{"gnd", "query", "cause"}``) and the seconds spent."""

    per_query: List[Tuple[Dict[str, Any], Dict[str, Any]]] = field(default_factory=list)
    rankings: List[np.ndarray] = field(default_factory=list)
    rankings_rr: List[np.ndarray] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    t_extract: float = 0.0
    t_search: float = 0.0
    t_rerank: float = 0.0


def _run_queries(idx, ext, queries: List[Dict[str, Any]], root: Optional[Path], row_of: Dict[str, int], revisited: bool,
                 searcher, reranker, K: int, rerank_top: int, progress: bool) -> _Run:
    """Crop, describe, search (and re-rank) each query; a query whose image is missing or unreadable is skipped."""
    from ..data import resize_max_side
    from ..progress import bar as _progress, log as _log

    run = _Run()
    pb = _progress(total=len(queries), desc="protocol queries", enabled=progress, unit="query")
    for q in queries:
        qpath = _query_path(q["query"], root, row_of, idx.paths)
        if qpath is None:
            cause = "query image not in the gallery" + (" (and no --images folder)" if revisited else "")
            run.skipped.append({"gnd": q["gnd"], "query": q["query"], "cause": cause})
            pb.update()
            continue
        t0 = time.time()
        try:
            full = query_crop(qpath, q.get("box"), None)
            _, vec = idx.describe_images([resize_max_side(full, ext.max_side) if ext.max_side else full])
        except (DecodeError, CbirError) as e:
            run.skipped.append({"gnd": q["gnd"], "query": str(qpath), "cause": str(getattr(e, "cause", e))})
            _log(f"skipped query {q['gnd']}: {e}", pb)
            pb.update()
            continue
        t1 = time.time()
        s, ids = searcher(vec, K)
        t2 = time.time()
        run.rankings.append(ids[0][ids[0] >= 0])
        item = {"gnd": q["gnd"], "query": str(q["query"]), "query_path": str(qpath), "box": q.get("box")}
        if reranker is not None:
            ids_rr = reranker.rerank_image(reranker.query_frame(full), ids[0], s[0], top=rerank_top)
            ids_rr = reranker.expand_verified(ids_rr, vec, searcher, K)
            run.rankings_rr.append(ids_rr[ids_rr >= 0])
            run.t_rerank += time.time() - t2
        run.t_extract += t1 - t0
        run.t_search += t2 - t1
        run.per_query.append((q, item))
        pb.update()
    pb.close()
    return run


def _score_revisited(ranks_list, per_query, rv: Dict[str, Any], row_of: Dict[str, int], n: int, gpath: Path,
                     folder) -> Dict[str, Any]:
    """revisitop's scores of the rankings, per setup: ``{setup: {"map", "mp@k"..., "aps"}}``; the gallery must hold
    the whole imlist."""
    im_rows = np.array([row_of.get(s, -1) for s in rv["imlist"]])
    missing = int((im_rows < 0).sum())
    if missing:
        raise CbirError(f"{gpath}: {missing} of the {len(im_rows)} imlist images are not in the gallery {folder} "
                        "(the revisited protocol ranks exactly its imlist)")
    inv = np.full(n, -1, np.int64)
    inv[im_rows] = np.arange(len(im_rows))
    ranks = np.stack([inv[rk] for rk in ranks_list], 1)
    g_used = [rv["gnd"][int(q["gnd"][1:])] for q, _ in per_query]
    out: Dict[str, Any] = {}
    for setup in SETUPS:
        res = compute_map(ranks, revisited_setup(g_used, setup), REVISITED_KS)
        out[setup] = {"map": res["map"], **{f"mp@{k}": (None if np.isnan(v) else float(v)) for k, v in zip(REVISITED_KS, res["mp"])},
                      "aps": [None if np.isnan(a) else float(a) for a in res["aps"]]}
    return out


def _score_classic(ranks_list, per_query, stems: np.ndarray) -> Dict[str, Any]:
    """cbir's AP and the trapezoidal AP of each classic query's ranking (junk taken out): ``{"aps", "trap"}``."""
    aps, tr = [], []
    for (q, _), rk in zip(per_query, ranks_list):
        names = stems[rk]
        present = q["pos"] & set(stems)
        aps.append(plain_ap(names, q["pos"], q["junk"], len(present)))
        keep = ~np.isin(names, list(q["junk"]))
        jfree = rk[keep]
        pos = np.flatnonzero(np.isin(stems[jfree], list(q["pos"])))
        tr.append(compute_ap(pos, len(present)))
    return {"aps": aps, "trap": tr}


def _metrics(scores: Dict[str, Any], revisited: bool) -> Dict[str, Any]:
    """The report's means: per setup (``map`` = Medium's) for revisited, ``map`` and ``map_trapezoid`` for classic."""
    if revisited:
        out = {s: {k: v for k, v in scores[s].items() if k != "aps"} for s in SETUPS}
        out["map"] = out["medium"]["map"]
        return out
    return {"map": float(np.mean(scores["aps"])), "map_trapezoid": float(np.mean(scores["trap"]))}


def _query_items(idx, run: _Run, base: Dict[str, Any], rr: Optional[Dict[str, Any]], stems: np.ndarray,
                 revisited: bool) -> List[Dict[str, Any]]:
    """Each scored query's report item with its AP(s) and ranking(s) as gallery names."""
    queries_out = []
    for j, ((q, item), rk) in enumerate(zip(run.per_query, run.rankings)):
        if revisited:
            item["ap"] = {s: base[s]["aps"][j] for s in SETUPS}
        else:
            item["ap"] = base["aps"][j]
            item["n_positives"] = len(q["pos"] & set(stems))
        item["ranking"] = [str(x) for x in idx.names[rk]]
        if rr is not None:
            item["ap_rerank"] = {s: rr[s]["aps"][j] for s in SETUPS} if revisited else rr["aps"][j]
            item["ranking_rerank"] = [str(x) for x in idx.names[run.rankings_rr[j]]]
        queries_out.append(item)
    return queries_out


def evaluate_gnd(index, gnd: PathLike, rerank: Optional[str] = None, rerank_top: int = 100,
                 rerank_conf: Optional[Dict[str, Any]] = None, expand: Any = "index", progress: bool = True,
                 max_rank: Optional[int] = None, images: Optional[PathLike] = None) -> Dict[str, Any]:
    """Score ``index`` (a folder or an opened :class:`cbir.query.Index`) on an Oxford/Paris ground truth.

    ``gnd``: a classic gt folder or a revisited JSON (module docstring). Query images are the gallery's own files
    (classic) or ``images/NAME.jpg`` under ``images`` (revisited; default: the gallery's folder of the first match).
    ``expand``: the graph stage (``"index"``: what the index records; None: plain search). Returns a report with
    ``n_queries``, ``metrics`` (``map``, ``map_trapezoid``; per setup for revisited), ``metrics_rerank`` when
    re-ranked, and per query ``gnd``, ``query``, ``ap`` and ``ranking`` (gallery names, junk included).

    The phases: the queries (``_read_queries``), their search (``_run_queries``), the scores (``_score_revisited`` /
    ``_score_classic``, ``_metrics``), the per-query items (``_query_items``).
    """
    from ..query import Index

    t_start = time.time()
    idx = index if isinstance(index, Index) else Index(index)
    gpath = Path(gnd)
    stems = np.array([stem(n) for n in idx.names], dtype=object)
    row_of = {}
    for i, s in enumerate(stems):
        row_of.setdefault(s, i)
    n = len(idx)
    K = n if max_rank is None else min(n, int(max_rank))
    searcher = idx.searcher(expand)
    reranker = None
    if rerank:
        from ..local.rerank import Reranker

        reranker = Reranker(idx, rerank, conf=rerank_conf or {})
    ext = idx.extractor
    rv, queries, root = _read_queries(gpath, images)
    revisited = rv is not None
    run = _run_queries(idx, ext, queries, root, row_of, revisited, searcher, reranker, K, rerank_top, progress)
    per_query = run.per_query
    if not per_query:
        why = run.skipped[0]["cause"] if run.skipped else "the ground truth lists no query"
        raise CbirError(f"{gpath}: no query can be evaluated ({len(run.skipped)} skipped, e.g. {why})")

    def score(ranks_list) -> Dict[str, Any]:
        if revisited:
            return _score_revisited(ranks_list, per_query, rv, row_of, n, gpath, idx.folder)
        return _score_classic(ranks_list, per_query, stems)

    base = score(run.rankings)
    rep: Dict[str, Any] = {"index": str(idx.folder), "gnd": str(gpath), "protocol": "revisited" if revisited else "oxford-paris",
                           "extractor": idx.extractor_name, "gallery_size": n, "n_queries": len(per_query),
                           "n_queries_listed": len(queries), "n_queries_skipped": len(run.skipped), "queries_skipped": run.skipped,
                           "expand": searcher.describe(), "max_rank": K}
    rep["metrics"] = _metrics(base, revisited)
    rr = score(run.rankings_rr) if reranker is not None else None
    if rr is not None:
        rep["metrics_rerank"] = _metrics(rr, revisited)
        rep["rerank"] = {"matcher": rerank, "top": rerank_top, **reranker.describe()}
    rep["queries"] = _query_items(idx, run, base, rr, stems, revisited)
    rep["seconds"] = {"extract_queries": round(run.t_extract, 3), "search": round(run.t_search, 3),
                      "search_ms_per_query": round(1000 * run.t_search / len(per_query), 3), "total": round(time.time() - t_start, 3)}
    if reranker is not None:
        rep["seconds"]["rerank"] = round(run.t_rerank, 3)
        rep["seconds"]["rerank_s_per_query"] = round(run.t_rerank / len(per_query), 4)
    return rep
