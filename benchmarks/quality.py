"""Retrieval quality of every extractor x backbone on corel1k and ukbench56 (leave-one-out, cosine/Hamming).

Runs the engine exactly as the CLI does (build an index, evaluate it) and writes one JSON per dataset
under benchmarks/results/ with the metrics and the seconds per image of each configuration. Indexes
are kept under indexes/bench/ so a re-run only evaluates (builds resume). Usage:

    python benchmarks/quality.py                 # everything (about an hour on 2 cores; DISK dominates)
    python benchmarks/quality.py --only fused pooled-xfeat --datasets ukbench56
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from cbir.data import load_dataset  # noqa: E402
from cbir.engine import build_index, evaluate, train_head  # noqa: E402
from cbir.errors import CbirError  # noqa: E402
from cbir.extractors import configure  # noqa: E402
from cbir.extractors.runtime import set_threads  # noqa: E402

# name -> (extractor, conf); the defaults of cbir are marked in the JSON
CONFIGS = {
    "fused (default)": configure("fused"),
    "pooled-aliked-n16 (pooled default)": configure("pooled", backbone="aliked-n16"),
    "pooled-aliked-n16-gap": configure("pooled", backbone="aliked-n16", pool="gap"),
    "pooled-aliked-n16-multiscale": configure("pooled", backbone="aliked-n16", scales=[1.0, 0.707]),
    "pooled-aliked-t16": configure("pooled", backbone="aliked-t16"),
    "pooled-xfeat": configure("pooled", backbone="xfeat"),
    "pooled-disk": configure("pooled", backbone="disk"),
    "colour": configure("colour"),
    "vlad-rootsift": configure("vlad", extra={"local": "rootsift"}),
    "vlad-xfeat": configure("vlad", extra={"local": "xfeat"}),
    "hash (default: centred fused)": configure("hash"),
    "hash-seed (plain mean-hash of fused)": configure("hash", extra={"project": "none"}),
    "hash-pooled": configure("hash", base="pooled"),
}


def run(ds_name: str, names, out_dir: Path, idx_root: Path, threads: int) -> dict:
    ds = load_dataset(ds_name)
    results = {}
    for name in names:
        ext, conf = CONFIGS[name]
        folder = idx_root / ds_name / name.split(" ")[0]
        t0 = time.time()
        rep = build_index(ds.gallery, folder, extractor=ext, conf=conf, progress=True, dataset={"name": ds_name})
        build_s = time.time() - t0
        ev = evaluate(folder, dataset=ds_name, progress=False)
        sec = rep.manifest["seconds"]
        per_img = sec["extract"] / max(1, rep.extracted) if rep.extracted else None
        results[name] = {
            "extractor": ext, "conf": conf, "dim": rep.manifest["dim"], "metric": rep.manifest["metric"],
            "metrics": ev["metrics"], "seconds_per_image": round(per_img, 4) if per_img else "(index reused)",
            "build_seconds": round(build_s, 1),
        }
        m = ev["metrics"]
        print(f"{ds_name:10s} {name:40s} P@10={m['precision@10']:.3f} mAP={m['map']:.3f}"
              + (f" N-S={m['ns_score']:.3f}" if "ns_score" in m else "") + f"  {results[name]['seconds_per_image']} s/img", flush=True)
    return results


def run_semantic(idx_root: Path) -> dict:
    """Head trained on corel1k's train split (first half of each class), evaluated on the test split."""
    head = idx_root / "corel1k-head.h5"
    t0 = time.time()
    if not head.exists():
        train_head(load_dataset("corel1k", split="train").gallery, head, progress=True)
    t_train = time.time() - t0
    folder = idx_root / "corel1k" / "semantic-test"
    build_index(load_dataset("corel1k", split="test").gallery, folder, extractor="semantic", conf={"head": str(head)}, progress=True)
    ev = evaluate(folder, dataset="corel1k", split="test", progress=False)
    m = ev["metrics"]
    print(f"corel1k    semantic (train->test)                  P@10={m['precision@10']:.3f} mAP={m['map']:.3f}", flush=True)
    return {"semantic (head on train split, test split)": {"metrics": m, "train_seconds": round(t_train, 1)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["corel1k", "ukbench56"])
    ap.add_argument("--only", nargs="+", help="config names (prefix match) to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-semantic", action="store_true")
    a = ap.parse_args()
    set_threads(a.threads)
    names = [n for n in CONFIGS if not a.only or any(n.startswith(o) for o in a.only)]
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    idx_root = REPO / "indexes" / "bench"
    for ds in a.datasets:
        try:
            res = run(ds, names, out_dir, idx_root, a.threads)
        except CbirError as e:
            print(f"skipping {ds}: {e}")
            continue
        if ds == "corel1k" and not a.no_semantic and (not a.only or any("semantic".startswith(o) for o in a.only)):
            res.update(run_semantic(idx_root))
        path = out_dir / f"quality_{ds}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(res)
        path.write_text(json.dumps(old, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
