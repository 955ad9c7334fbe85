"""The benchmark suite that chooses the defaults: one pipeline (or a grid) on every collection of ../shared/data.

A pipeline is an extractor (a name or a named conf of cbir.extractors.CONFS) and a graph stage (alpha-QE, DBA,
diffusion: cbir/index/expansion.py, named in GRAPHS below). Each is run exactly as `cbir index build` + `cbir eval`
run it, on:

    corel1k             category (10 x 100), leave-one-out by label          P@10, mAP
    ukbench56           instance (14 x 4), leave-one-out                      N-S, mAP
    boofcv24            instance (8 x 3), leave-one-out                       mAP
    caltech101_objects  category (80 x 30), leave-one-out by label           P@10, mAP
    paris6k_subset      landmarks (195 images of 5), leave-one-out by label  P@10, mAP
    paris6k_protocol    the Oxford/Paris protocol on its 250 images (12 queries cropped to their boxes, junk
                        removed; `cbir eval --gnd`)                           mAP

and reports each figure with ``mean_map`` (the mean of the six mAPs: what a default is chosen by) and
``mean_p10`` (the mean P@10 of the four collections with more than 4 images a label). Indexes are kept under
indexes/bench/suite/<extractor>/<collection>, so a grid over graph stages extracts once per extractor.

    python benchmarks/suite.py                                    # the default pipeline (what `cbir` does with no option)
    python benchmarks/suite.py --extractors pooled fused --graphs none qe2 qe2-dba3 diffusion
    python benchmarks/suite.py --grid                             # every extractor x graph stage of the study
    python benchmarks/suite.py --table                            # README's table from benchmarks/results/suite.json

Results: benchmarks/results/suite.json (one row a pipeline: figures, seconds, what was applied).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from cbir.data import load_dataset, read_file_list  # noqa: E402
from cbir.engine import Index, build_index, evaluate  # noqa: E402
from cbir.eval.protocol import evaluate_gnd  # noqa: E402
from cbir.extractors import configure  # noqa: E402
from cbir.runtime import set_threads  # noqa: E402
from cbir.index.expansion import DEFAULT_GRAPH  # noqa: E402

DATA = REPO.parent / "shared" / "data"
PARIS = DATA / "landmark_paris6k_subset"
#: collection -> (dataset name or None, metrics reported); paris6k_protocol is built from gnd_paris6k.csv
COLLECTIONS = {
    "corel1k": ("corel1k", ["precision@10", "map"]),
    "ukbench56": ("ukbench56", ["ns_score", "map"]),
    "boofcv24": ("boofcv24", ["map"]),
    "caltech101_objects": ("caltech101_objects", ["precision@10", "map"]),
    "paris6k_subset": ("paris6k_subset", ["precision@10", "map"]),
    "paris6k_protocol": (None, ["map"]),
}
#: the graph stages of the study; "default" = what `cbir index build` records (cbir.index.expansion.DEFAULT_GRAPH)
GRAPHS: Dict[str, Any] = {
    "default": DEFAULT_GRAPH,
    "none": None,
    "qe1": {"qe_k": 1},
    "qe2": {"qe_k": 2},
    "qe3": {"qe_k": 3},
    "qe5": {"qe_k": 5},
    "dba2": {"dba_k": 2},
    "dba3": {"dba_k": 3},
    "qe1-dba2": {"qe_k": 1, "dba_k": 2},
    "qe2-dba2": {"qe_k": 2, "dba_k": 2},
    "qe2-dba3": {"qe_k": 2, "dba_k": 3},
    "qe3-dba3": {"qe_k": 3, "dba_k": 3},
    "qe2-dba5": {"qe_k": 2, "dba_k": 5},
    "qe3-dba5": {"qe_k": 3, "dba_k": 5},
    "qe5-dba5": {"qe_k": 5, "dba_k": 5},
    "qe2-dba3-a1": {"qe_k": 2, "dba_k": 3, "alpha": 1.0},
    "qe5-dba7": {"qe_k": 5, "dba_k": 7},
    "qe7-dba7": {"qe_k": 7, "dba_k": 7},
    "qe10-dba10": {"qe_k": 10, "dba_k": 10},
    "qe7-dba5": {"qe_k": 7, "dba_k": 5},
    "qe5-dba3": {"qe_k": 5, "dba_k": 3},
    "qe5-dba5-a2": {"qe_k": 5, "dba_k": 5, "alpha": 2.0},
    "qe5-dba5-a5": {"qe_k": 5, "dba_k": 5, "alpha": 5.0},
    "qe7-dba7-a5": {"qe_k": 7, "dba_k": 7, "alpha": 5.0},
    "qe4-dba7": {"qe_k": 4, "dba_k": 7},
    "qe5-dba10": {"qe_k": 5, "dba_k": 10},
    "qe5-dba7-a4": {"qe_k": 5, "dba_k": 7, "alpha": 4.0},
    "qe6-dba7": {"qe_k": 6, "dba_k": 7},
    "qe3-dba3-a5": {"qe_k": 3, "dba_k": 3, "alpha": 5.0},
}
GRAPHS.update({f"diff-k{k}-q{q}-a{a}": {"diffusion": {"k": k, "kq": q, "alpha": a / 100}}
               for k in (5, 10, 20, 50) for q in (3, 5, 10) for a in (50, 80, 90, 99)})
GRAPHS.update({f"dba3-diff-k{k}-q{q}-a{a}": {"dba_k": 3, "diffusion": {"k": k, "kq": q, "alpha": a / 100}}
               for k in (10, 20) for q in (5, 10) for a in (80, 90)})
#: the extractors of the study (name -> cbir.extractors.configure arguments)
EXTRACTORS: Dict[str, Dict[str, Any]] = {
    "default": {"name": None},  # what `cbir index build` uses without --extractor (DEFAULT_EXTRACTOR + DEFAULT_CONF)
    "pooled": {"name": "pooled"},
    "fused": {"name": "fused"},
    "mnv2-gem": {"name": "mnv2-gem"},
    "mnv2-gap-ms": {"name": "mnv2-gap-ms"},
}


def _same_as(ext: str) -> str:
    """The study's name of the extractor ``ext`` resolves to (``default`` is one of the others): its indexes are reused."""
    from cbir.extractors import make_extractor

    key = make_extractor(*configure(**EXTRACTORS[ext])).key()
    for other, args in EXTRACTORS.items():
        if other != ext and make_extractor(*configure(**args)).key() == key:
            return other
    return ext


def _index(ext: str, coll: str, work: Path, local: Optional[str] = None) -> Path:
    ext = _same_as(ext) if ext == "default" else ext
    folder = work / (ext if local is None else f"{ext}+local-{local}") / coll
    if (folder / "manifest.json").is_file():
        return folder
    name, conf = configure(**EXTRACTORS[ext])
    kw = {"extractor": name, "conf": conf, "local": local}
    ds = COLLECTIONS[coll][0]
    entries = load_dataset(ds).gallery if ds else read_file_list(PARIS / "gnd_paris6k.csv", root=PARIS, label_column="status")
    t0 = time.time()
    build_index(entries, folder, progress=False, dataset={"name": ds or coll}, **kw)
    (folder.parent / f"{coll}.build_seconds").write_text(f"{time.time() - t0:.1f}\n")
    return folder


def run_one(ext: str, graph: str, work: Path, collections: List[str], rerank: Optional[str] = None, local: str = "default",
            rerank_conf: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    row: Dict[str, Any] = {"extractor": ext, "graph": graph, "collections": {}}
    if rerank:
        row["rerank"] = rerank + ("" if local == "default" else f" ({local})") + (f" {json.dumps(rerank_conf)}" if rerank_conf else "")
    for coll in collections:
        folder = _index(ext, coll, work, local=local if rerank else None)
        idx = Index(folder)
        t0 = time.time()
        kw = {"rerank": rerank, "rerank_top": 100, "rerank_conf": rerank_conf or {}} if rerank else {}
        if coll == "paris6k_protocol":
            rep = evaluate_gnd(idx, PARIS / "gt", expand=GRAPHS[graph], progress=False, **kw)
        else:
            rep = evaluate(idx, dataset=COLLECTIONS[coll][0], progress=False, expand=GRAPHS[graph], **kw)
        secs = time.time() - t0
        m = rep["metrics_rerank"] if rerank else rep["metrics"]
        fig = {k: round(float(m[k]), 4) for k in COLLECTIONS[coll][1]}
        if "map" not in fig:
            fig["map"] = round(float(m["map"]), 4)
        bs = folder.parent / f"{coll}.build_seconds"
        if rerank:
            fig["before_rerank"] = {k: round(float(rep["metrics"][k]), 4) for k in COLLECTIONS[coll][1]}
            fig["rerank_s_per_query"] = rep["seconds"]["rerank_s_per_query"]
        fig.update({"n_queries": rep["n_queries"], "eval_seconds": round(secs, 2),
                    "build_seconds": float(bs.read_text()) if bs.is_file() else None,
                    "ms_per_query": round(1000 * secs / max(1, rep["n_queries"]), 2)})
        row["applied"] = rep.get("expand")
        row["extractor_conf"] = {"name": idx.extractor_name, "conf": idx.manifest["extractor"]["conf"]}
        row["collections"][coll] = fig
    c = row["collections"]
    maps = [v["map"] for v in c.values()]
    p10 = [v["precision@10"] for k, v in c.items() if "precision@10" in v]
    row["mean_map"] = round(sum(maps) / len(maps), 4) if maps else None
    row["mean_p10"] = round(sum(p10) / len(p10), 4) if p10 else None
    return row


def fmt(row: Dict[str, Any]) -> str:
    c = row["collections"]
    parts = []
    for coll, fig in c.items():
        parts.append(coll + " " + "/".join(f"{fig[k]:.3f}" for k in COLLECTIONS[coll][1]))
    rr = f" +rerank {row['rerank']}" if row.get("rerank") else ""
    return f"{row['extractor']:12s} {row['graph']:12s}{rr} mean mAP {row['mean_map']:.4f}  " + "  ".join(parts)


def table(rows: List[Dict[str, Any]], select: Optional[List[str]] = None) -> str:
    """README's markdown table: one row a pipeline, a column a collection (its metrics named in the header);
    ``select``: only these ``EXTRACTOR/GRAPH`` rows, in this order."""
    colls = list(COLLECTIONS)
    short = {"precision@10": "P@10", "map": "mAP", "ns_score": "N-S"}
    head = "| extractor | graph stage | " + " | ".join(f"{c} {' / '.join(short[m] for m in COLLECTIONS[c][1])}" for c in colls) + " | mean mAP |"
    lines = [head, "|" + "---|" * (len(colls) + 3)]
    full = [r for r in rows if set(r["collections"]) == set(colls) and not r.get("rerank")]  # rows over every collection only
    if select:
        by = {f"{r['extractor']}/{r['graph']}": r for r in full}
        full = [by[k] for k in select if k in by]
    else:
        full = sorted(full, key=lambda r: -(r["mean_map"] or 0))
    for r in full:
        cells = []
        for c in colls:
            f = r["collections"].get(c)
            cells.append(" / ".join(f"{f[m]:.3f}" if m != "ns_score" else f"{f[m]:.2f}" for m in COLLECTIONS[c][1]) if f else "")
        rr = f" + rerank {r['rerank']}" if r.get("rerank") else ""
        lines.append(f"| {r['extractor']} | {r['graph']}{rr} | " + " | ".join(cells) + f" | {r['mean_map']:.4f} |")
    return "\n".join(lines)


def _save(path: Path, row: Dict[str, Any]) -> None:
    """Put ``row`` into the results file, read again just before (runs side by side each keep their rows), replacing
    the row of the same pipeline unless that one covers collections this one does not."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cur = json.loads(path.read_text()) if path.is_file() else {"rows": []}
        key = (row["extractor"], row["graph"], row.get("rerank"))
        keep = [r for r in cur["rows"] if (r["extractor"], r["graph"], r.get("rerank")) != key
                or set(r["collections"]) - set(row["collections"])]
        cur["rows"] = keep + [row]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cur, indent=1) + "\n")
        os.replace(tmp, path)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extractors", nargs="+", default=["default"], choices=sorted(EXTRACTORS))
    ap.add_argument("--graphs", nargs="+", default=["default"], choices=sorted(GRAPHS), metavar="GRAPH",
                    help=f"graph stages by name (default: default): {', '.join(sorted(GRAPHS))}")
    ap.add_argument("--rerank", metavar="NAME", help="also re-rank the top 100 (indexes built with --local default; e.g. default)")
    ap.add_argument("--local", default="default", help="the local features of --rerank's indexes (default: %(default)s)")
    ap.add_argument("--rerank-conf", type=json.loads, help="options of the re-ranker as JSON, e.g. '{\"sv_qe\": null}'")
    ap.add_argument("--grid", action="store_true", help="every extractor x every graph stage")
    ap.add_argument("--collections", nargs="+", default=list(COLLECTIONS), choices=list(COLLECTIONS))
    ap.add_argument("--work", type=Path, default=REPO / "indexes" / "bench" / "suite", help="where the indexes are kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "suite.json")
    ap.add_argument("--table", action="store_true", help="print README's table from --out and stop")
    ap.add_argument("--select", nargs="+", metavar="EXTRACTOR/GRAPH", help="with --table: only these rows, in this order")
    ap.add_argument("--json", action="store_true", help="print the rows of this run as JSON")
    a = ap.parse_args(argv)
    old = json.loads(a.out.read_text()) if a.out.is_file() else {"rows": []}
    if a.table:
        print(table(old["rows"], a.select))
        return 0
    set_threads(a.threads)
    exts = sorted(EXTRACTORS) if a.grid else a.extractors
    graphs = [g for g in GRAPHS if g != "default"] if a.grid else a.graphs
    rows = []
    for ext in exts:
        for g in graphs:
            row = run_one(ext, g, a.work, a.collections, a.rerank, a.local, a.rerank_conf)
            rows.append(row)
            print(fmt(row), flush=True)
            _save(a.out, row)
    if a.json:
        print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
