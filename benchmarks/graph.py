"""What the graph stage costs at scale: the k-NN graph at build, its update when images are added or removed, and
the milliseconds per query of each graph stage, at 10k and 100k images (issue 19).

    python benchmarks/graph.py                         # N = 10k and 100k, writes benchmarks/results/graph.json
    python benchmarks/graph.py --n 10000 --queries 200

Descriptors: noisy copies of the real default-extractor (pooled) descriptors of corel1k + caltech101_objects (the
model of benchmarks/scale.py: Gaussian noise with the real set's covariance, scaled so a copy is as close to its seed
as real nearest neighbours are). The search structure is the one `cbir index build` picks at N (``auto_spec``: flat
below 50k, IVF-SQ8 with PCA above), and the graph comes from its search, as in a build. Per N:

* ``graph_build_s``: every image's K neighbours (what the default stage needs, DBA's k + 1: cbir/index/knn.py);
* ``add_1000_s`` / ``remove_1000_s``: knn.update for 1,000 new images / 1,000 removed ones, next to recomputing
  the whole graph (``full_recompute_s``), and whether the update equals the recomputation (``update_equals_full``);
* ``ms_per_query``: plain search, the default stage (alpha-QE over DBA) and diffusion, single queries; ``open_s``
  what the stage makes when an index is opened. Past 50k images DBA is searched by a shortlist (cbir/index/expansion.py):
  ``shortlist_recall_at_10`` is its top-10 overlap with the exact scan of the augmented gallery (``exact_ms_per_query``,
  ``exact_open_s``) on the same queries.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from scale import Generator, calibrate  # noqa: E402


def real_descriptors() -> np.ndarray:
    from cbir.data import load_dataset
    from cbir.engine import Index, build_index

    out = []
    for name in ("corel1k", "caltech101_objects"):
        folder = ROOT / "indexes" / "bench" / "suite" / "pooled" / name
        if not (folder / "manifest.json").is_file():
            build_index(load_dataset(name).gallery, folder, extractor="pooled", progress=False)
        out.append(np.asarray(Index(folder).descriptors, np.float32))
    x = np.concatenate(out)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def backend_for(x: np.ndarray, ids: np.ndarray):
    from cbir.index.backend import FaissBackend, auto_spec

    spec = auto_spec("cosine", x.shape[1], len(x))
    b = FaissBackend(spec)
    if not b.is_trained:
        rng = np.random.default_rng(0)
        b.train(x[rng.choice(len(x), min(len(x), 200_000), replace=False)])
    b.add(ids, x)
    return b


class _Gal:
    """Just what the graph stage reads of an opened index: vectors, ids, search (rows), metric."""

    def __init__(self, x, ids, backend, knn_graph):
        self.descriptors, self.ids, self.backend, self.metric, self.folder = x, ids, backend, "cosine", Path("synthetic")
        self._graph = knn_graph
        self.manifest = {}

    def __len__(self):
        return len(self.ids)

    def search(self, v, k, exclude=None):
        ex = None if exclude is None else np.where(np.asarray(exclude) >= 0, self.ids[np.maximum(exclude, 0)], -1)
        s, i = self.backend.search(v, k, exclude=ex)
        return s, np.where(i >= 0, np.searchsorted(self.ids, np.maximum(i, 0)), -1)

    def stored_knn(self, k):
        from cbir.index import knn

        nbr, sims = self._graph
        return knn.as_rows(nbr, sims, self.ids) if nbr.shape[1] >= k else None


def run(n: int, gen: Generator, n_queries: int, k: int) -> dict:
    from cbir.index import knn
    from cbir.index.expansion import DEFAULT_GRAPH, Searcher, parse_expand

    x = np.concatenate([v for _, v in gen.gallery(n + 1000)])
    ids = np.arange(n + 1000, dtype=np.int64)
    base, extra = x[:n], x[n:]
    row: dict = {"n": n, "k": k}
    t = time.time()
    b = backend_for(base, ids[:n])
    row["index_build_s"] = round(time.time() - t, 2)
    row["spec"] = b.factory_string(b.spec)
    t = time.time()
    g = knn.compute(base, ids[:n], b.search, k)
    row["graph_build_s"] = round(time.time() - t, 2)
    # add 1,000
    b.add(ids[n:], extra)
    t = time.time()
    upd, counts = knn.update(*g, ids[:n], ids, x, b.search, k)
    row["add_1000_s"] = round(time.time() - t, 3)
    row["add_1000_counts"] = counts
    t = time.time()
    full = knn.compute(x, ids, b.search, k)
    row["full_recompute_s"] = round(time.time() - t, 2)
    row["add_speedup"] = round(row["full_recompute_s"] / max(row["add_1000_s"], 1e-9), 1)
    row["update_equals_full"] = float((upd[0] == full[0]).mean())
    # remove 1,000 (from the grown gallery)
    rng = np.random.default_rng(1)
    rm = np.sort(rng.choice(len(ids), 1000, replace=False))
    keep = np.setdiff1d(np.arange(len(ids)), rm)
    b.remove(ids[rm])
    t = time.time()
    upd2, counts2 = knn.update(*full, ids, ids[keep], x[keep], b.search, k)
    row["remove_1000_s"] = round(time.time() - t, 3)
    row["remove_1000_counts"] = counts2
    full2 = knn.compute(x[keep], ids[keep], b.search, k)
    row["remove_equals_full"] = float((upd2[0] == full2[0]).mean())
    # query cost of each stage
    gal = _Gal(x[keep], ids[keep], b, upd2)
    q, _ = gen.queries(n_queries)
    row["ms_per_query"] = {}
    dflt = f"default (qe{DEFAULT_GRAPH['qe_k']} + dba{DEFAULT_GRAPH['dba_k']})"
    for name, spec in (("none", None), (dflt, DEFAULT_GRAPH), ("diffusion k5", {"diffusion": {"k": 5, "kq": 5}})):
        t = time.time()
        sr = Searcher(gal, spec)
        opened = time.time() - t
        t = time.time()
        for i in range(n_queries):
            sr(q[i : i + 1], 100)
        row["ms_per_query"][name] = round(1000 * (time.time() - t) / n_queries, 3)
        if spec:
            row.setdefault("open_s", {})[name] = round(opened, 3)
    from cbir.index.expansion import SHORTLIST_FROM, Expander, knn_graph

    if len(gal) > SHORTLIST_FROM:  # the shortlist against the exact scan of the augmented gallery, same queries
        spec = parse_expand(DEFAULT_GRAPH)
        kw = dict(qe_k=spec["qe_k"], alpha=spec["alpha"], dba_k=spec["dba_k"], knn=lambda kk: knn_graph(gal, kk))
        t = time.time()
        exact = Expander(gal.descriptors, gal.search, shortlist=0, **kw)
        row["exact_open_s"] = round(time.time() - t, 2)
        short = Expander(gal.descriptors, gal.search, **kw)
        nq = min(100, n_queries)
        t = time.time()
        e_ids = np.concatenate([exact.search(q[i : i + 1], 10)[1] for i in range(nq)])
        row["exact_ms_per_query"] = round(1000 * (time.time() - t) / nq, 2)
        s_ids = np.concatenate([short.search(q[i : i + 1], 10)[1] for i in range(nq)])
        row["shortlist"] = short.shortlist
        row["shortlist_recall_at_10"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(e_ids, s_ids)])), 4)
    print(json.dumps(row), flush=True)
    return row


def table(d: dict) -> str:
    """README's table from a graph.json."""
    out = ["| N | search structure | k-NN graph at build | add 1,000 (recomputing all) | remove 1,000 | ms/query: plain / default "
           "stage / diffusion k5 | default stage at open |", "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        m, o = r["ms_per_query"], r["open_s"]
        dk = next(k for k in m if k.startswith("default"))
        extra = (f" (exact scan: {r['exact_ms_per_query']:.0f} ms, top-10 overlap {r['shortlist_recall_at_10']:.3f})"
                 if "shortlist_recall_at_10" in r else "")
        out.append(f"| {r['n']:,} | {r['spec']} | {r['graph_build_s']:.1f} s | {r['add_1000_s']:.1f} s ({r['full_recompute_s']:.1f} s; "
                   f"{100 * r['update_equals_full']:.1f} % of lists equal) | {r['remove_1000_s']:.1f} s "
                   f"({r['remove_1000_counts']['searched']:,} lists searched again) | {m['none']:.1f} / {m[dk]:.0f}{extra} / "
                   f"{m['diffusion k5']:.1f} | {o[dk]:.2f} s" + (f" (exact scan: {r['exact_open_s']:.1f} s)" if "exact_open_s" in r else "") + " |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    import faiss

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=HERE / "results" / "graph.json")
    ap.add_argument("--table", action="store_true", help="print README's table from --json and stop")
    a = ap.parse_args(argv)
    if a.table:
        print(table(json.loads(a.json.read_text())))
        return 0
    faiss.omp_set_num_threads(a.threads)
    from cbir.index import knn
    from cbir.index.expansion import DEFAULT_GRAPH

    real = real_descriptors()
    cal = calibrate(real)
    gen = Generator(real, cal["noise_scale"])
    rows = [run(n, gen, a.queries, knn.graph_k(DEFAULT_GRAPH)) for n in a.n]
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"calibration": cal, "threads": a.threads, "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
