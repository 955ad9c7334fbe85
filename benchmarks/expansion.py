"""alpha-QE and DBA (cbir/index/expansion.py) on the default extractor, leave-one-out, as `cbir eval --qe-k/--dba-k`.

Reuses the indexes benchmarks/quality.py keeps under indexes/bench/<dataset>/fused (builds them when
missing) and writes benchmarks/results/expansion.json. Usage:

    python benchmarks/expansion.py                       # corel1k, ukbench56, boofcv24 (a few minutes on 2 cores)
    python benchmarks/expansion.py --datasets ukbench56
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
from cbir.engine import Index, build_index, evaluate  # noqa: E402
from cbir.runtime import set_threads  # noqa: E402

#: name -> expand (None: plain search)
SETTINGS = {"none": None}
SETTINGS.update({f"qe{k}": {"qe_k": k, "alpha": 3.0} for k in (1, 2, 5, 10)})
SETTINGS.update({f"dba{k}": {"dba_k": k, "alpha": 3.0} for k in (1, 2, 5, 10)})
SETTINGS.update({f"dba{k}+qe{k}": {"qe_k": k, "dba_k": k, "alpha": 3.0} for k in (1, 2, 5)})
SETTINGS["qe5-alpha1"] = {"qe_k": 5, "alpha": 1.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["corel1k", "ukbench56", "boofcv24"])
    ap.add_argument("--indexes", nargs="+", default=["fused"],
                    help="index names under indexes/bench/<dataset>/ (fused: the default extractor, built when missing; "
                    "colour: a weaker descriptor whose rankings are not saturated on ukbench56/boofcv24)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    set_threads(a.threads)
    path = HERE / "results" / "expansion.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for ds in a.datasets:
        for name_idx in a.indexes:
            folder = REPO / "indexes" / "bench" / ds / name_idx
            if not (folder / "manifest.json").is_file() and name_idx == "fused":
                build_index(load_dataset(ds).gallery, folder, extractor="fused", progress=False, dataset={"name": ds})
            idx = Index(folder)
            res = {}
            for name, expand in SETTINGS.items():
                t0 = time.time()
                rep = evaluate(idx, dataset=ds, progress=False, expand=expand)
                m = rep["metrics"]
                res[name] = {"expand": rep["expand"], "leave_one_out": rep["leave_one_out"], "n_queries": rep["n_queries"],
                             "precision@10": round(m["precision@10"], 4), "map": round(m["map"], 4),
                             **({"ns_score": round(m["ns_score"], 4)} if "ns_score" in m else {}),
                             "seconds": round(time.time() - t0, 2)}
                print(f"{ds:10s} {name_idx:8s} {name:12s} P@10={m['precision@10']:.3f} mAP={m['map']:.4f}"
                      + (f" N-S={m['ns_score']:.3f}" if "ns_score" in m else "") + f"  {res[name]['seconds']} s", flush=True)
            out.setdefault(ds, {})[name_idx] = {"extractor": idx.extractor_name + (" (default)" if name_idx == "fused" else ""),
                                                "index": str(folder.relative_to(REPO)), "results": res}
            path.write_text(json.dumps(out, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
