"""Geometric re-ranking on instance datasets: metrics before and after, seconds per query, per matcher.

For each dataset, an index of the default (fused) descriptor is built once with local features stored
(``--local``), then ``evaluate(..., rerank=MATCHER)`` re-ranks the top candidates of every query
(leave-one-out). Writes benchmarks/results/rerank.json.

    python benchmarks/rerank.py [--datasets ukbench56 boofcv24] [--configs xfeat:lighterglue:512 xfeat:mnn:512]
    python benchmarks/rerank.py --datasets corel1k --queries 20     # top-100 cost on a 1000-image gallery

ukbench56 and boofcv24 hold fewer than 100 images, so their shortlists are the whole gallery less the query;
``--queries N`` re-ranks only N evenly spaced gallery images (leave-one-out), which keeps a large gallery cheap.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from cbir.data import load_dataset  # noqa: E402
from cbir.engine import build_index, evaluate  # noqa: E402
from cbir.errors import CbirError  # noqa: E402
from cbir.extractors.runtime import set_threads  # noqa: E402

DEFAULT_CONFIGS = ["xfeat:lighterglue:512", "xfeat:lighterglue:256", "xfeat:mnn:512", "aliked:lightglue:512", "sift:mnn:1024"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ukbench56", "boofcv24"])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="FEATURES:MATCHER:KEYPOINTS[:ROTATIONS], e.g. xfeat:lighterglue:256:0,90,180,270")
    ap.add_argument("--top", type=int, default=100)
    ap.add_argument("--extractor", default="fused", help="global descriptor whose ranking is re-ranked (default: fused)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, help="re-rank only this many evenly spaced gallery images (default: all)")
    a = ap.parse_args()
    set_threads(a.threads)
    path = HERE / "results" / "rerank.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for ds in a.datasets:
        try:
            gallery = load_dataset(ds).gallery
        except CbirError as e:
            print(f"skipping {ds}: {e}")
            continue
        for cfg in a.configs:
            feats, matcher, kp, *rot = cfg.split(":")
            conf = {"max_keypoints": int(kp)}
            if rot:
                conf["rotations"] = [int(r) for r in rot[0].split(",")]
            folder = REPO / "indexes" / "bench" / f"{ds}-{a.extractor}-local-{feats}"
            build_index(gallery, folder, extractor=a.extractor, local=feats, progress=False)
            queries, root = _query_list(gallery, a.queries) if a.queries else (None, None)
            t0 = time.time()
            rep = evaluate(folder, dataset=None if queries else ds, queries=queries, root=root, rerank=matcher, rerank_top=a.top, rerank_conf=conf, progress=False)
            row = {
                "global": a.extractor, "features": feats, "matcher": matcher, "max_keypoints": int(kp), "rotations": conf.get("rotations", [0]), "top": a.top, "gallery": rep["gallery_size"],
                "metrics": rep["metrics"], "metrics_rerank": rep["metrics_rerank"],
                "rerank_s_per_query": rep["seconds"]["rerank_s_per_query"],
                "n_queries": rep["n_queries"],
                "pairs_per_query": min(a.top, rep["gallery_size"] - 1),
                "wall_seconds": round(time.time() - t0, 1),
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],  # > threads: timings shared the CPU
            }
            row["rerank_ms_per_pair"] = round(1000 * row["rerank_s_per_query"] / row["pairs_per_query"], 1)
            results[f"{ds} {a.extractor} {cfg}" + (f" q{a.queries}" if a.queries else "")] = row
            g, r = rep["metrics"], rep["metrics_rerank"]
            ns = f" N-S {g.get('ns_score', float('nan')):.3f} -> {r.get('ns_score', float('nan')):.3f}" if "ns_score" in g else ""
            print(f"{ds:10s} {a.extractor:7s} {cfg:24s} mAP {g['map']:.4f} -> {r['map']:.4f}  P@1 {g['precision@1']:.3f} -> {r['precision@1']:.3f}{ns}"
                  f"  {row['rerank_s_per_query']:.2f} s/query ({row['rerank_ms_per_pair']} ms/pair)", flush=True)
            path.parent.mkdir(exist_ok=True)
            path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return 0


def _query_list(gallery, n: int):
    """A file list of ``n`` evenly spaced gallery images under their gallery names, and the root they resolve against."""
    import numpy as np

    first = gallery[0]
    root = str(first.path)[: len(str(first.path)) - len(first.name)]
    pick = np.linspace(0, len(gallery) - 1, num=min(n, len(gallery))).round().astype(int)
    fd, path = tempfile.mkstemp(suffix=".txt", prefix="cbir-rerank-queries-")
    with os.fdopen(fd, "w") as f:
        for i in pick:
            e = gallery[int(i)]
            f.write(f"{e.name}\t{e.label}\n")
    return path, root


if __name__ == "__main__":
    sys.exit(main())
