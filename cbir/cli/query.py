"""``cbir query``: rank the gallery for query images (table, JSON, result grid)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

from ..cliutil import positive_int, tty_safe
from ..errors import CbirError

from .common import (add_common, add_search_params, rerank_conf_from_args, add_rerank, expand_conf_from_args, add_expand)


def cmd_query(a) -> int:
    from ..engine import load_index

    from ..folders import expand_images

    a.images, _ = expand_images(a.images)  # a folder: its images, in walk order
    idx = load_index(a.index)
    idx.check_extractor(a.extractor)
    idx.set_search(nprobe=a.nprobe, ef=a.ef)
    # an unreadable query is one failure entry, not the end of the others' results
    failures: List[Dict[str, Any]] = []
    expand = expand_conf_from_args(a)
    if a.rerank:
        from ..local.rerank import Reranker

        res = Reranker(idx, a.rerank, conf=rerank_conf_from_args(a)).query_images(a.images, top_k=a.top_k, top=a.rerank_top, failures=failures,
                                                                         with_matches=bool(a.grid), expand=expand)
    else:
        res = idx.query_images(a.images, top_k=a.top_k, failures=failures, expand=expand)
    if not res:
        if len(failures) == 1:
            raise CbirError(f"{failures[0]['path']}: {failures[0]['cause']}")
        few = "; ".join(f"{f['path']}: {f['cause']}" for f in failures[:3])
        raise CbirError(f"none of the {len(failures)} queries could be answered: {few}" + (f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""))
    for f in failures:
        print(f"skipped query {tty_safe(f['path'])}: {tty_safe(f['cause'])}", file=sys.stderr)
    if a.json:
        print(json.dumps({"index": str(a.index), "extractor": idx.extractor_name, "graph": idx.searcher(expand).describe(),
                          "queries": res, "failures": failures}, indent=2))
    else:
        for q in res:
            print(f"query {tty_safe(q['query'])}  ({q['seconds'] * 1000:.0f} ms)")
            print(f"  {'rank':>4}  {'score':>8}  {'label':<16} name")
            for r in q["results"]:
                lab = r["label_name"] if r["label_name"] is not None else "-"
                extra = (f"  inliers {r['inliers']}" + (", verified" if r.get("verified") else "")) if "inliers" in r else ""
                print(f"  {r['rank']:>4}  {r['score']:>8.4f}  {tty_safe(lab):<16} {tty_safe(r['name'])}{extra}")
    if a.grid:
        failed = {f["position"] for f in failures}
        _grid(idx, res, a.grid, positions=[i for i in range(len(a.images)) if i not in failed], n_inputs=len(a.images))
    if failures and a.strict:
        print(f"error: --strict: {len(failures)} of {len(a.images)} queries could not be answered", file=sys.stderr)
        return 2
    return 0


def _grid(idx, res, out: str, positions: Optional[List[int]] = None, n_inputs: Optional[int] = None) -> None:
    """One figure per answered query: ``out`` itself for a single query image, else ``out_<i>`` with ``i`` the
    position of the query among the IMAGE arguments (``positions``), so unreadable queries leave a gap, never a shift."""
    from ..data import decode_image
    from ..eval.plots import result_grid
    from ..errors import DecodeError

    def load(p):
        try:
            return decode_image(p, max_side=400)
        except DecodeError:
            return None

    base, ext = os.path.splitext(out)
    n = len(res) if n_inputs is None else n_inputs
    for qi, q in zip(positions if positions is not None else range(len(res)), res):
        path = out if n == 1 else f"{base}_{qi}{ext or '.png'}"
        from ..local.draw import overlay_hits  # verified re-ranked hits: query | hit with the inlier lines

        imgs = overlay_hits(load(q["query"]), [load(r["path"]) for r in q["results"]], q["results"])
        titles = [f"#{r['rank']} {r['label_name'] if r['label_name'] is not None else ''}\n{r['score']:.3f}"
                  + (f", {r['inliers']} inliers" if r.get("verified") else "") for r in q["results"]]
        ql = q.get("query_label")
        correct = [None if ql is None or r["label"] is None else r["label"] == ql for r in q["results"]]
        result_grid(load(q["query"]), "query\n" + os.path.basename(q["query"]), imgs, titles, path, correct=correct)
        print(f"grid written to {tty_safe(path)}", file=sys.stderr)


def register(sub, add_common=None) -> None:
    """Add this module's sub-command(s) to the main parser."""
    q = sub.add_parser("query", help="rank the gallery for query images", description="Rank the gallery of an index for each query image.")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="query images, or folders whose images (walked recursively, hidden and "
                   "non-image files skipped) are queries")
    q.add_argument("--index", required=True, metavar="DIR")
    q.add_argument("--top-k", type=positive_int, default=10, help="results per query (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    q.add_argument("--grid", metavar="PNG", help="draw the query and its top k with labels and scores (one file per query: PNG_0, PNG_1... "
                   "numbered by the IMAGE's position; unreadable queries get none)")
    q.add_argument("--strict", action="store_true", help="exit with status 2 when any query image cannot be answered (the others are "
                   "still printed); without it unreadable queries are reported (stderr, and 'failures' in --json) and the exit "
                   "status is 2 only when none could be answered")
    q.add_argument("--extractor", metavar="NAME", help="refuse to run unless the index was built with this extractor")
    add_expand(q)
    add_rerank(q)
    add_search_params(q)
    add_common(q)
    q.set_defaults(func=cmd_query)
