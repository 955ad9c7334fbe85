"""Geometric re-ranking: metrics before and after, seconds per query and each stage's share, bytes per image.

Every row re-ranks one dataset's leave-one-out rankings with one stored local-feature conf and one re-ranker, both
by the names the CLI takes (``--local NAME`` at build, ``--rerank NAME`` at query; cbir.local.confs):

    python benchmarks/rerank.py                                    # ukbench56 from pooled ALIKED-n16 (mAP 0.81), top 55
    python benchmarks/rerank.py --datasets corel1k                 # fused ranking, top 100, every query; seed 000 on 20
    python benchmarks/rerank.py --configs default:default default:seed000 sift:mnn:1024

A config is ``LOCAL:RERANKER[:KEYPOINTS[:ROTATIONS]]``. For each LOCAL the index is built once (the global rows are
reused between LOCALs of a dataset) and ``local.h5``'s size per image is recorded. ``seed000`` is seed 000's recipe
(kd-tree NN within 0.8 + skimage affine RANSAC, 3 samples, 20 px, 1000 trials) on the same stored features; it runs
on ``--seed-queries`` evenly spaced queries, and the default re-ranker runs on those same queries in the same run, so
the row carries the speed ratio and both mAPs. Writes benchmarks/results/rerank.json (rows keyed by dataset, global
and config; earlier rows of other keys are kept) and prints a table.

Timings are wall-clock on whatever else the machine runs (``loadavg_at_end`` says how busy it was): read the ratios.
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
from cbir.runtime import set_threads  # noqa: E402

from cbir.local.confs import LOCAL_CONFS  # noqa: E402

#: dataset -> (global extractor, its conf, shortlist size, seed-000 queries (None: all))
PRESETS = {
    "ukbench56": ("pooled", {"backbone": "aliked-n16"}, 55, None),
    "corel1k": ("fused", {}, 100, 20),
    "boofcv24": ("pooled", {"backbone": "aliked-n16"}, 23, None),
}
DEFAULT_CONFIGS = [
    "default:default", "default:fast", "default:mnn", "default:seed000",
    "rootsift-256-fp16:default", "sift:mnn:1024",
    "xfeat:lighterglue:256", "xfeat-compact:default", "xfeat-compact:lighterglue",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["ukbench56"])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="LOCAL:RERANKER[:KEYPOINTS[:ROTATIONS]], e.g. default:default, "
                    "xfeat:lighterglue:256:0,90,180,270")
    ap.add_argument("--top", type=int, help="candidates re-ranked per query (default: the dataset's preset)")
    ap.add_argument("--extractor", help="global descriptor whose ranking is re-ranked (default: the dataset's preset)")
    ap.add_argument("--backbone", help="with --extractor pooled")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, help="re-rank only this many evenly spaced gallery images (default: all)")
    ap.add_argument("--seed-queries", type=int, help="queries of the seed000 rows (default: all for ukbench56, 20 for corel1k)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "rerank.json")
    a = ap.parse_args()
    set_threads(a.threads)
    results = json.loads(a.out.read_text()) if a.out.exists() else {}
    for ds in a.datasets:
        try:
            gallery = load_dataset(ds).gallery
        except CbirError as e:
            print(f"skipping {ds}: {e}")
            continue
        pname, pconf, ptop, pseed = PRESETS.get(ds, ("fused", {}, 100, 20))
        gname = a.extractor or pname
        gconf = ({"backbone": a.backbone} if a.backbone else {}) if a.extractor else dict(pconf)
        gtag = gname + (f"-{gconf['backbone']}" if gconf.get("backbone") else "")
        top = a.top or ptop
        seed_n = a.seed_queries if a.seed_queries is not None else pseed
        folder = REPO / "indexes" / "bench" / f"rerank-{ds}-{gtag}"
        built = None
        for cfg in a.configs:
            local, reranker, *rest = cfg.split(":")
            conf = {}
            if rest and rest[0]:
                conf["max_keypoints"] = int(rest[0])
            if len(rest) > 1:
                conf["rotations"] = [int(r) for r in rest[1].split(",")]
            if built != local:
                t0 = time.time()
                build_index(gallery, folder, extractor=gname, conf=gconf, local=local, progress=False)
                built, build_s = local, round(time.time() - t0, 1)
            n_img = len(gallery)
            per_image = (folder / "local.h5").stat().st_size / max(1, n_img)
            nq = seed_n if reranker == "seed000" and seed_n else a.queries
            queries, root = _query_list(gallery, nq) if nq else (None, None)
            row = _run(folder, ds, queries, root, reranker, top, conf)
            row.update({"dataset": ds, "global": gtag, "local": local, "local_conf": LOCAL_CONFS.get(local, {}).get("conf"),
                        "reranker": reranker, "top": top, "gallery": n_img, "local_bytes_per_image": round(per_image),
                        "build_s": build_s})
            if reranker == "seed000":  # the default cascade on the same features and queries, in the same run
                ref = _run(folder, ds, queries, root, "default", top, {})
                row["default_same_queries"] = {k: ref[k] for k in ("map_before", "map_after", "rerank_s_per_query", "share")}
                row["seed_over_default_speed_ratio"] = round(row["rerank_s_per_query"] / max(ref["rerank_s_per_query"], 1e-9), 1)
            key = f"{ds} {gtag} {cfg}" + (f" q{nq}" if nq else "")
            results[key] = row
            _print(key, row)
            a.out.parent.mkdir(exist_ok=True)
            a.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {a.out}")
    return 0


def _run(folder: Path, ds: str, queries, root, reranker: str, top: int, conf):
    t0 = time.time()
    rep = evaluate(folder, dataset=None if queries else ds, queries=queries, root=root, rerank=reranker, rerank_top=top,
                   rerank_conf=conf, progress=False)
    g, r = rep["metrics"], rep["metrics_rerank"]
    d = rep["rerank"]
    timing = d.get("timing", {})
    pairs = max(1, int(timing.get("pairs", 0)))
    return {
        "map_before": g["map"], "map_after": r["map"],
        "ns_before": g.get("ns_score"), "ns_after": r.get("ns_score"),
        "p@1_before": g["precision@1"], "p@1_after": r["precision@1"],
        "rerank_s_per_query": rep["seconds"]["rerank_s_per_query"],
        "rerank_ms_per_pair": round(1000 * rep["seconds"]["rerank"] / pairs, 3),
        "n_queries": rep["n_queries"],
        "timing": timing,
        "share": timing.get("share", {}),
        "max_keypoints": d.get("max_keypoints"),
        "rotations": d.get("rotations"),
        "describe": {k: v for k, v in d.items() if k not in ("timing",)},
        "wall_seconds": round(time.time() - t0, 1),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],  # > threads: timings shared the CPU
    }


def _print(key: str, row) -> None:
    share = ", ".join(f"{k} {100 * v:.0f}%" for k, v in row["share"].items())
    ns = f" N-S {row['ns_before']:.2f} -> {row['ns_after']:.2f}" if row.get("ns_before") is not None else ""
    extra = ""
    if "seed_over_default_speed_ratio" in row:
        ref = row["default_same_queries"]
        extra = f"  [default on the same queries: mAP {ref['map_after']:.4f} at {ref['rerank_s_per_query']:.4f} s/q; seed/default {row['seed_over_default_speed_ratio']}x]"
    print(f"{key:52s} mAP {row['map_before']:.4f} -> {row['map_after']:.4f}{ns}  {row['rerank_s_per_query']:.4f} s/q "
          f"({row['rerank_ms_per_pair']} ms/pair)  {row['local_bytes_per_image']} B/img  [{share}]{extra}", flush=True)


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
