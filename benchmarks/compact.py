"""Retrieval quality of each compact search structure next to exact search, on the real datasets.

The default descriptor of every gallery image is extracted once (an index under indexes/bench/<dataset>/fused,
built if missing); each setting then builds its faiss structure (cbir.index.backend) on those descriptors and is
evaluated leave-one-out exactly as `cbir eval` does (P@10, mAP, N-S). Settings a gallery is too small to learn
(PQ: 256 images, PCA: D images) are reported as skipped. Writes benchmarks/results/compact.json.

    python benchmarks/compact.py [--datasets corel1k ukbench56 boofcv24]
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

import numpy as np  # noqa: E402

from cbir.data import load_dataset  # noqa: E402
from cbir.engine import Index, build_index  # noqa: E402
from cbir.errors import CbirError  # noqa: E402
from cbir.eval.metrics import MetricAccumulator  # noqa: E402
from cbir.index.backend import FaissBackend, SearchSpec  # noqa: E402

SETTINGS = {
    "exact float32": {},
    "float16": {"codec": "float16"},
    "sq8": {"codec": "sq8"},
    "pq64": {"codec": "pq", "code_bytes": 64},
    "pca256 + pq64": {"dim": 256, "codec": "pq", "code_bytes": 64},
    "pca256 + pq32": {"dim": 256, "codec": "pq", "code_bytes": 32},
    "pca256 + pq64, whiten 0.5": {"dim": 256, "whiten_power": 0.5, "codec": "pq", "code_bytes": 64},
    "pca512 uncentred + sq8": {"dim": 512, "pca_centre": False, "codec": "sq8"},
    "pca512 uncentred + sq8 + ivf16": {"dim": 512, "pca_centre": False, "codec": "sq8", "ann": "ivf", "nlist": 16, "nprobe": 4},
    "pca32 + float16": {"dim": 32, "codec": "float16"},
    "hnsw float16": {"ann": "hnsw", "codec": "float16"},
}


def evaluate(backend: FaissBackend, x: np.ndarray, labels: np.ndarray) -> dict:
    n = len(x)
    counts = {l: int((labels == l).sum()) for l in set(labels)}
    acc = MetricAccumulator((1, 5, 10), with_ns=all(c == 4 for c in counts.values()), self_in_gallery=True)
    s, ids = backend.search(x, n, exclude=np.arange(n))
    rel = (labels[np.maximum(ids, 0)] == labels[:, None]) & (ids >= 0)
    acc.update(rel, np.array([counts[l] - 1 for l in labels]))
    return acc.summary()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["corel1k", "ukbench56", "boofcv24"])
    ap.add_argument("--json", default=str(HERE / "results" / "compact.json"))
    a = ap.parse_args()
    out = {"what": __doc__.splitlines()[0], "descriptor": "fused (default)", "datasets": {}}
    for ds in a.datasets:
        folder = REPO / "indexes" / "bench" / ds / "fused"
        if not (folder / "manifest.json").is_file():
            build_index(load_dataset(ds).gallery, folder, progress=False, dataset={"name": ds})
        idx = Index(folder)
        x = np.asarray(idx.descriptors, np.float32)
        labels = np.array([str(l) for l in idx.labels], dtype=object)
        rows = {}
        for name, kw in SETTINGS.items():
            t0 = time.time()
            try:
                spec = SearchSpec(metric="cosine", dim_in=x.shape[1], **kw)
                b = FaissBackend(spec)
                b.train(x)
                b.add(np.arange(len(x)), x)
                m = evaluate(b, x, labels)
                rows[name] = {"precision@10": round(m["precision@10"], 4), "map": round(m["map"], 4),
                              "ns_score": m.get("ns_score"), "bytes_per_image": spec.bytes_per_image, "seconds": round(time.time() - t0, 2)}
            except CbirError as e:
                rows[name] = {"skipped": str(e)}
            print(ds, name, rows[name], flush=True)
        out["datasets"][ds] = {"images": len(x), "dim": int(x.shape[1]), "settings": rows}
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"written to {a.json}")


if __name__ == "__main__":
    main()
