"""``cbir eval``: retrieval metrics of an index on labelled queries."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict

from ..cliutil import non_negative_int, positive_int, tty_safe

from .common import (add_common, add_source, add_search_params, rerank_conf_from_args, add_rerank, expand_conf_from_args, add_expand, METRICS_HELP)


def cmd_eval(a) -> int:
    from ..engine import evaluate

    if a.list:  # --list is accepted as a synonym of --queries
        a.queries = a.list
    from ..engine import load_index

    idx = load_index(a.index)
    idx.check_extractor(a.extractor)
    idx.set_search(nprobe=a.nprobe, ef=a.ef)
    if a.gnd:
        return _cmd_gnd(a, idx)
    rep = evaluate(idx, dataset=a.dataset, split=a.split, queries=a.queries, root=a.root, ks=a.k, rerank=a.rerank,
                   rerank_top=a.rerank_top, rerank_conf=rerank_conf_from_args(a), max_rank=a.max_rank, datasets_yaml=a.datasets, progress=not a.quiet,
                   workers=a.workers, plot=a.plot, expand=expand_conf_from_args(a), labels=a.labels)
    print_eval(rep, a.k)
    if a.json:
        from ..index.atomic import write_json_atomic

        json.dumps(rep, allow_nan=False)  # the report is strict JSON (undefined metrics are null): fail here, not in a reader
        write_json_atomic(rep, a.json)
        print(f"json written to {tty_safe(a.json)}", file=sys.stderr)
    if a.plot:
        print(f"PR curve written to {tty_safe(a.plot)}", file=sys.stderr)
    return 0


def _cmd_gnd(a, idx) -> int:
    """``cbir eval --gnd``: the Oxford/Paris protocol (cbir/eval/protocol.py)."""
    from ..errors import CbirError
    from ..eval.protocol import evaluate_gnd

    if a.dataset or a.queries:
        raise CbirError("--gnd takes its queries from the ground truth; drop --dataset / --queries")
    rep = evaluate_gnd(idx, a.gnd, rerank=a.rerank, rerank_top=a.rerank_top, rerank_conf=rerank_conf_from_args(a), expand=expand_conf_from_args(a),
                       progress=not a.quiet, max_rank=a.max_rank, images=a.images)
    m, mr = rep["metrics"], rep.get("metrics_rerank")
    skipped = f", {rep['n_queries_skipped']} skipped (query image not in the gallery)" if rep["n_queries_skipped"] else ""
    print(f"{tty_safe(rep['gnd'])} ({rep['protocol']}): {rep['n_queries']} queries{skipped}, gallery {rep['gallery_size']}, "
          f"extractor {tty_safe(rep['extractor'])}")
    if rep["protocol"] == "revisited":
        for setup in ("easy", "medium", "hard"):
            line = "  " + setup.ljust(8) + " ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in m[setup].items())
            if mr:
                line += "   reranked " + " ".join(f"{k} {v:.4f}" if v is not None else f"{k} -" for k, v in mr[setup].items())
            print(line)
    else:
        print(f"  mAP {m['map']:.4f} (trapezoidal, as the official compute_ap: {m['map_trapezoid']:.4f})"
              + (f"; re-ranked {mr['map']:.4f} ({mr['map_trapezoid']:.4f})" if mr else ""))
    _print_graph(rep.get("expand"))
    sec = rep["seconds"]
    print(f"  seconds: queries extracted {sec['extract_queries']}, search {sec['search']} ({sec['search_ms_per_query']} ms/query)"
          + (f", rerank {sec['rerank']} ({sec['rerank_s_per_query']} s/query)" if "rerank" in sec else ""))
    if a.json:
        from ..index.atomic import write_json_atomic

        json.dumps(rep, allow_nan=False)
        write_json_atomic(rep, a.json)
        print(f"json written to {tty_safe(a.json)}", file=sys.stderr)
    return 0


def _print_graph(x) -> None:
    if not x:
        print("  graph stage: none (plain top-k)")
        return
    parts = []
    if x.get("qe_k"):
        parts.append(f"alpha-QE k={x['qe_k']}")
    if x.get("dba_k"):
        parts.append(f"DBA k={x['dba_k']}")
    if x.get("qe_k") or x.get("dba_k"):
        parts.append(f"alpha={x['alpha']:g}")
    d = x.get("diffusion")
    if d:
        parts.append("diffusion " + ", ".join(f"{k}={v:g}" for k, v in d.items()))
    print("  graph stage: " + ", ".join(parts))


def print_eval(rep: Dict[str, Any], ks) -> None:
    m = rep["metrics"]
    mr = rep.get("metrics_rerank")
    apart = []
    if rep.get("n_queries_without_relevant"):
        ex = (rep.get("queries_without_relevant") or [{}])[0]
        apart.append(f"{rep['n_queries_without_relevant']} without a relevant gallery image left out"
                     + (f", e.g. {tty_safe(ex['name'])} (label {tty_safe(repr(ex['label']))})" if ex else ""))
    if rep.get("query_failures"):
        f0 = rep["query_failures"][0]
        apart.append(f"{len(rep['query_failures'])} unreadable skipped, e.g. {tty_safe(f0['path'])}: {tty_safe(f0['cause'])}")
    split = "/" + tty_safe(rep["split"]) if rep.get("split") else ""
    head = f"{tty_safe(rep['dataset'])}{split}: {rep['n_queries']} queries{' (' + '; '.join(apart) + ')' if apart else ''}, " \
           f"gallery {rep['gallery_size']}, extractor {tty_safe(rep['extractor'])} ({rep['metric']}){', leave-one-out' if rep['leave_one_out'] else ''}"
    print(head)

    def cell(v) -> str:  # an undefined mean (no query with a relevant item) is None in the report
        return f"{'-':<11}" if v is None else f"{v:<11.4f}"

    cols = ["metric", "global"] + (["reranked"] if mr else [])
    rows = [[k, m[k]] + ([mr[k]] if mr else []) for k in m]
    w = max(len(r[0]) for r in rows) + 2
    print("  " + "".join(c.ljust(w if i == 0 else 11) for i, c in enumerate(cols)))
    for r in rows:
        print("  " + r[0].ljust(w) + "".join(cell(v) for v in r[1:]))
    sd = rep.get("seed_definition") or {}
    if sd:
        print("  (seed 003's 'mAP@1/5/10' on the same rankings: " + ", ".join("-" if v is None else f"{v:.4f}" for v in sd.values())
              + "; its @5/@10 are precision@5/@10, its @1 reads the 2nd result)")
    s = rep["seconds"]
    line = f"  seconds: queries extracted {s['extract_queries']}, search {s['search']} ({s['search_ms_per_query']} ms/query)"
    if "rerank" in s:
        line += f", rerank {s['rerank']} ({s['rerank_s_per_query']} s/query)"
    print(line)
    _print_graph(rep.get("expand"))


def register(sub, add_common=None) -> None:
    """Add this module's sub-command(s) to the main parser."""
    e = sub.add_parser("eval", help="retrieval metrics of an index on labelled queries",
                       description="Rank the gallery for every query and report precision@k, AP@k, full mAP (and the N-S score where every class has 4 images). "
                                   "Queries that are gallery images are left out of their own ranking (leave-one-out). " + METRICS_HELP)
    e.add_argument("--index", required=True, metavar="DIR")
    add_source(e, required=False, queries=True)
    e.add_argument("--list", help=argparse.SUPPRESS)
    e.add_argument("--k", type=positive_int, nargs="+", default=[1, 5, 10], metavar="K", help="cut-offs for precision@k and AP@k (default: 1 5 10)")
    e.add_argument("--json", metavar="PATH", help="write the report as JSON")
    e.add_argument("--plot", metavar="PNG", help="draw the precision-recall curve")
    e.add_argument("--extractor", metavar="NAME", help="refuse to run unless the index was built with this extractor")
    e.add_argument("--gnd", metavar="PATH", help="the Oxford/Paris protocol: a folder of the official ground-truth files "
                   "(NAME_query.txt with the query box, NAME_good/ok/junk.txt): queries cropped to their boxes, positives good + ok, "
                   "junk left out of the ranking; or a revisited-protocol JSON (revisitop's gnd layout): Easy / Medium / Hard mAP "
                   "and mP@1/5/10. Query images are found in the gallery by file stem")
    e.add_argument("--images", metavar="DIR", help="with a revisited --gnd: the folder of its query images (NAME.jpg), when they "
                   "are not gallery images")
    add_expand(e)
    add_rerank(e)
    add_search_params(e)
    e.add_argument("--max-rank", type=positive_int, help="rank only this many results per query (mAP then counts relevant items beyond as misses)")
    e.add_argument("--workers", type=non_negative_int, default=2, help="image decoding threads (default: %(default)s; 0: decode in the main thread)")
    add_common(e)
    e.set_defaults(func=cmd_eval)
