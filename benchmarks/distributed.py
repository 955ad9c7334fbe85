"""Distributed building blocks (issue 15): extraction on Ray against local extraction, and the Milvus store's queries
against faiss, in one run on this machine.

    python benchmarks/distributed.py [--dataset ukbench56] [--repeat 1] [--n 20000] [--queries 200]
                                     [--json benchmarks/results/distributed.json]

Extraction: the default extractor over the dataset's images (``--repeat`` times, for a longer run), ``batch_size`` 16,
decoded at the extractor's size, exactly the work of a build's extract phase:

* ``local``: :func:`cbir.distributed.local_rows` in this process (decode threads 2), torch at 1 and at 2 threads;
* ``ray-1`` / ``ray-2``: :func:`cbir.distributed.ray_rows` with 1 and 2 actors (1 CPU, 1 torch thread each) on a
  private local Ray cluster (loopback, ``num_cpus`` 2) started once for both. images/s counts the whole call
  (``with_start``: actor start and model load included) and the part after the actors are up (``steady``).

Each rows set is checked against the local one (same names, max |raw difference|).

Search: N synthetic unit vectors (``normalise(seed + noise)`` around the real descriptors of the extraction step, so
rankings have near-ties as real galleries do) in a faiss flat index and in a Milvus Lite flat collection (same spec,
what ``--store milvus:FILE.db`` builds); Q held-out queries, top-10: ms per query one at a time (as ``cbir query``)
and in one batch (as ``cbir eval``), recall@10 against an exact float64 scan and the share of top-10 lists equal to
faiss'. The machine is a shared 2-core one: read ratios, not absolute values.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the private loopback cluster of this run: no token kept in ~/.ray

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _collect(items):
    rows = {}
    for kind, *it in items:
        if kind == "rows":
            for e, r in zip(it[0], it[1]):
                rows[e.name] = r
    return rows


def bench_extraction(entries, repeat: int, batch: int) -> Dict:
    from cbir.data import Entry
    from cbir.distributed import RaySession, local_rows, ray_rows
    from cbir.extractors import DEFAULT_EXTRACTOR
    from cbir.extractors.base import make_extractor
    from cbir.runtime import set_threads

    todo = [Entry(f"{r}/{e.name}", e.path, e.label) for r in range(repeat) for e in entries]
    n = len(todo)
    ext = make_extractor(DEFAULT_EXTRACTOR, {})
    ext.extract([np.zeros((64, 64, 3), np.uint8)])  # weights loaded before any clock starts
    out: Dict = {"extractor": DEFAULT_EXTRACTOR, "images": n, "batch_size": batch, "runs": {}}
    ref = None
    for threads in (1, 2):
        set_threads(threads)
        t0 = time.perf_counter()
        rows = _collect(local_rows(todo, ext, batch_size=batch, decode_side=ext.max_side, workers=2))
        dt = time.perf_counter() - t0
        ref = ref or rows
        out["runs"][f"local-{threads}t"] = {"seconds": round(dt, 2), "images_per_s": round(n / dt, 2), "torch_threads": threads}
        print(f"local, {threads} torch thread(s): {n / dt:.2f} images/s", file=sys.stderr)
    set_threads(2)
    t0 = time.perf_counter()
    with RaySession("local", num_cpus=2) as session:
        out["ray_cluster_start_s"] = round(time.perf_counter() - t0, 2)
        out["ray_cluster"] = session.kind
        for actors in (1, 2):
            stats: Dict = {}
            t0 = time.perf_counter()
            rows = _collect(ray_rows(todo, ext, batch_size=batch, decode_side=ext.max_side, actors=actors, threads=1, stats=stats))
            dt = time.perf_counter() - t0
            steady = dt - stats["started_s"]
            worst = max(float(np.abs(rows[k] - ref[k]).max()) for k in ref)
            out["runs"][f"ray-{actors}"] = {
                "actors": actors, "seconds": round(dt, 2), "actor_start_s": stats["started_s"],
                "images_per_s_with_start": round(n / dt, 2), "images_per_s_steady": round(n / steady, 2),
                "same_names_as_local": sorted(rows) == sorted(ref), "max_abs_diff_vs_local": worst,
            }
            print(f"ray, {actors} actor(s): {n / steady:.2f} images/s steady ({n / dt:.2f} with start), max diff {worst:.2g}",
                  file=sys.stderr)
    out["note"] = "torch threads: local runs as labelled; each Ray actor 1 thread on 1 CPU of a 2-CPU local cluster"
    return out, np.stack([ref[e.name] for e in todo[: len(entries)]]), ext


def _synthetic(seeds: np.ndarray, n: int, rng) -> np.ndarray:
    """``normalise(seed + s * noise)``, noise in the span of the centred seeds; s puts the median cosine to the seed at ~0.86."""
    c = seeds - seeds.mean(0)
    mix = rng.standard_normal((n, len(seeds))).astype(np.float32) / np.sqrt(len(seeds))
    noise = mix @ c
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    base = seeds[rng.integers(0, len(seeds), n)]
    x = base + 0.6 * noise
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def bench_search(seeds: np.ndarray, n: int, nq: int, k: int = 10) -> Dict:
    from cbir.index.backend import FaissBackend, SearchSpec
    from cbir.index.milvus import MilvusBackend, parse_store, release_lite

    rng = np.random.default_rng(0)
    x = _synthetic(seeds, n, rng)
    q = _synthetic(seeds, nq, np.random.default_rng(1))
    ids = np.arange(n, dtype=np.int64)
    exact = np.argsort(-(q.astype(np.float64) @ x.astype(np.float64).T), axis=1, kind="stable")[:, :k]
    spec = SearchSpec(metric="cosine", dim_in=x.shape[1])
    res: Dict = {"n": n, "queries": nq, "k": k, "dim": int(x.shape[1]), "spec": "flat float32, inner product of unit vectors"}

    def measure(name, b, t_add):
        t0 = time.perf_counter()
        for i in range(min(nq, 50)):
            b.search(q[i : i + 1], k)
        single = (time.perf_counter() - t0) / min(nq, 50)
        t0 = time.perf_counter()
        _, got = b.search(q, k)
        batch = (time.perf_counter() - t0) / nq
        recall = float(np.mean([len(set(g) & set(e)) / k for g, e in zip(got, exact)]))
        res[name] = {"add_s": round(t_add, 2), "ms_per_query_single": round(1000 * single, 3),
                     "ms_per_query_batch": round(1000 * batch, 3), "recall_at_10": round(recall, 4)}
        print(f"{name}: {1000 * single:.2f} ms/query one by one, {1000 * batch:.3f} in a batch, recall@10 {recall:.4f}", file=sys.stderr)
        return got

    t0 = time.perf_counter()
    f = FaissBackend(spec)
    f.add(ids, x)
    got_f = measure("faiss", f, time.perf_counter() - t0)
    tmp = Path(tempfile.mkdtemp(prefix="cbir-milvus-bench-"))
    try:
        uri = parse_store(f"milvus:{tmp / 'bench.db'}")[1]
        t0 = time.perf_counter()
        m = MilvusBackend(spec, uri, "bench")
        m.add(ids, x)
        m.flush()
        got_m = measure("milvus_lite", m, time.perf_counter() - t0)
        res["top10_lists_equal_to_faiss"] = round(float(np.mean([(a == b).all() for a, b in zip(got_m, got_f)])), 4)
        res["milvus_lite_version"] = __import__("milvus_lite").__version__
        res["pymilvus_version"] = __import__("pymilvus").__version__
        m.close()
        release_lite(uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="ukbench56")
    ap.add_argument("--repeat", type=int, default=1, help="the image list this many times (longer extraction runs)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--n", type=int, default=20000, help="gallery size of the search comparison")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "distributed.json"))
    a = ap.parse_args(argv)

    import ray
    import torch

    from cbir.data import load_dataset

    ds = load_dataset(a.dataset)
    t0 = time.time()
    extraction, seeds, ext = bench_extraction(ds.gallery, a.repeat, a.batch_size)
    search = bench_search(ext.post(seeds), a.n, a.queries)
    report = {
        "benchmark": "distributed", "dataset": a.dataset, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__},
        "extraction": extraction, "search": search, "seconds": round(time.time() - t0, 1),
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
