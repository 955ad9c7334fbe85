"""Search structures at scale: memory, build time, query latency and recall of ``cbir.index.backend`` specs on N
synthetic descriptors that behave like real ones.

    python benchmarks/scale.py --n 200000 --json benchmarks/results/scale.json [--queries 1000] [--settings ...]

Data model: the real default-extractor descriptors (today ImageNet MobileNetV2 average-pooled at two scales,
1280-d unit vectors; the dimension is read from them) of corel1k + ukbench56 (1056 images) are the seeds; each synthetic vector is ``normalise(seed + s * noise)`` with ``noise`` Gaussian with the real set's
covariance (a random combination of the centred real descriptors: variation lies where real descriptors vary, not
isotropically in 1536-d). ``s`` is set so that the median cosine between a synthetic vector and its seed equals the
median nearest-neighbour cosine of the real set (0.86); the JSON records how often a synthetic vector's nearest real
descriptor is its seed. With ~N/1056 copies per seed, a query's exact top-10 is a ranking among many near-ties
(copies of its seed), which is what makes recall@10 against exact search hard.

Gallery vectors are generated deterministically chunk by chunk (chunk ``j`` from its own random stream), so they are
never all in memory: each setting regenerates them while it is fed. The exact top-10 of the queries (Q other noisy
copies, not in the gallery) comes from a chunked float32 scan. Each setting runs in its own process so its peak RSS
(``resource.getrusage``) is its own.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SOURCES = ("corel1k", "ukbench56")
CHUNK = 25_000
K = 10

# name -> how its spec is made (``auto``: auto_spec keywords at N; ``spec``: SearchSpec fields), query-time variants
NPROBES = [{"nprobe": p} for p in (4, 8, 16, 32, 64)]
SETTINGS: Dict[str, dict] = {
    "flat-f32": {"spec": {"ann": "flat", "codec": "float32"}, "variants": [{}]},
    "flat-f16": {"spec": {"ann": "flat", "codec": "float16"}, "variants": [{}]},
    # auto_spec's choice at N with no memory budget (the headline)
    "auto": {"auto": {}, "variants": NPROBES},
    # auto_spec's previous default / its choice under a 72-byte-per-image budget: centred PCA-256 + PQ64
    "ivf-pca256-pq64": {"auto": {"memory_budget_per_image": 72}, "variants": NPROBES},
    "ivf-pca256-f16": {"auto": {"ann": "ivf", "codec": "float16", "dim": 256}, "variants": [{"nprobe": 16}]},
    "ivf-pca256-f16-uncentred": {"auto": {"ann": "ivf", "codec": "float16", "dim": 256, "pca_centre": False}, "variants": [{"nprobe": 16}]},
    "ivf-pca384-sq8-uncentred": {"auto": {"ann": "ivf", "codec": "sq8", "dim": 384, "pca_centre": False}, "variants": [{"nprobe": 16}]},
    "ivf-sq8": {"auto": {"ann": "ivf", "codec": "sq8"}, "variants": [{"nprobe": 16}]},
    "hnsw-pca512-f16-uncentred": {"spec": {"ann": "hnsw", "codec": "float16", "dim": 512, "pca_centre": False},
                                  "variants": [{"ef": e} for e in (64, 128)]},
}
DEFAULT_SETTINGS = ["flat-f32", "flat-f16", "auto", "ivf-pca256-pq64", "ivf-pca256-f16", "ivf-pca256-f16-uncentred",
                    "ivf-pca384-sq8-uncentred"]  # hnsw-pca512-f16-uncentred: --settings (its build is the slowest)


def _faiss(threads: int):
    import faiss

    faiss.omp_set_num_threads(threads)
    return faiss


def real_descriptors() -> np.ndarray:
    from cbir.data import load_dataset
    from cbir.engine import Index, build_index
    from cbir.extractors import configure, make_extractor

    key = make_extractor(*configure(None)).key()  # the default pipeline's descriptor
    out = []
    for name in SOURCES:
        folder = ROOT / "indexes" / "bench" / "scale-src" / name
        try:
            idx = Index(folder)
            ok = idx.manifest["extractor"]["key"] == key
        except Exception:
            ok = False
        if not ok:  # not built yet (resumes an interrupted build), or built by an earlier default
            build_index(load_dataset(name).gallery, str(folder))
            idx = Index(folder)
        out.append(np.asarray(idx.descriptors, np.float32))
    x = np.concatenate(out)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Generator:
    """Noisy copies of real descriptors; chunk ``j`` of the gallery (or the query set) is always the same."""

    def __init__(self, real: np.ndarray, scale: float, seed: int = 0) -> None:
        self.real, self.scale, self.seed = real, float(scale), seed
        self.centred = (real - real.mean(0)) / np.sqrt(len(real))  # z @ centred ~ N(0, covariance of the real set)

    def make(self, stream: int, j: int, n: int):
        rng = np.random.default_rng([self.seed, stream, j])
        seeds = rng.integers(0, len(self.real), n)
        z = rng.standard_normal((n, len(self.real)), dtype=np.float32)
        v = self.real[seeds] + self.scale * (z @ self.centred)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v.astype(np.float32), seeds

    def gallery(self, n: int, chunk: int = CHUNK):
        for j, lo in enumerate(range(0, n, chunk)):
            v, _ = self.make(0, j, min(chunk, n - lo))
            yield lo, v

    def queries(self, q: int):
        return self.make(1, 0, q)


def calibrate(real: np.ndarray) -> dict:
    """Noise scale whose median cosine to the seed equals the real set's median nearest-neighbour cosine."""
    s = real @ real.T
    np.fill_diagonal(s, -2)
    target = float(np.median(s.max(1)))
    lo, hi = 0.0, 3.0
    for _ in range(30):
        mid = (lo + hi) / 2
        v, seeds = Generator(real, mid, seed=99).make(2, 0, 4000)
        med = float(np.median((v * real[seeds]).sum(1)))
        lo, hi = (mid, hi) if med > target else (lo, mid)
    scale = (lo + hi) / 2
    v, seeds = Generator(real, scale, seed=99).make(2, 1, 4000)
    rng = np.random.default_rng(7)
    z = rng.standard_normal((4000, len(real)), dtype=np.float32)
    c = Generator(real, scale).centred
    v2 = real[seeds] + scale * (z @ c)
    v2 /= np.linalg.norm(v2, axis=1, keepdims=True)
    return {"noise": "gaussian with the real descriptors' covariance, times scale, added to a real seed, L2-normalised",
            "noise_scale": scale, "matched": "median cosine(synthetic, its seed) = median nearest-neighbour cosine of the real set",
            "real_median_nn_cosine": target, "median_cosine_to_seed": float(np.median((v * real[seeds]).sum(1))),
            "nearest_real_is_seed": float(((v @ real.T).argmax(1) == seeds).mean()),
            "median_cosine_two_copies_same_seed": float(np.median((v * v2).sum(1))), "n_real": int(len(real))}


def exact_topk(gen: Generator, n: int, queries: np.ndarray, k: int = K):
    """Exact float32 inner-product top-k of ``queries`` over the gallery, chunk by chunk."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for lo, v in gen.gallery(n):
        s = queries @ v.T
        kk = min(k, s.shape[1])
        part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
        cs = np.take_along_axis(s, part, 1)
        alls = np.concatenate([best_s, cs], 1)
        alli = np.concatenate([best_i, part + lo], 1)
        o = np.argsort(-alls, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(alls, o, 1), np.take_along_axis(alli, o, 1)
    return best_s, best_i


def recall(found: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    r10 = np.mean([len(set(f[:K].tolist()) & set(t[:K].tolist())) / K for f, t in zip(found, truth)])
    return {"recall_at_1": float(np.mean(found[:, 0] == truth[:, 0])), "recall_at_10": float(r10)}


def make_spec(name: str, n: int, dim: int):
    from cbir.index.backend import SearchSpec, auto_spec

    conf = SETTINGS[name]
    if "spec" in conf:
        return SearchSpec(metric="cosine", dim_in=dim, **conf["spec"])
    kw = dict(conf["auto"])
    per = kw.pop("memory_budget_per_image", None)
    if per:
        kw["memory_budget"] = per * n
    return auto_spec("cosine", dim, n, **kw)


def run_setting(name: str, n: int, scale: float, qfile: str, timing_q: int, threads: int) -> List[dict]:
    """Build one setting and measure it (in its own process)."""
    faiss = _faiss(threads)
    from cbir.index.backend import FaissBackend

    real = real_descriptors()
    gen = Generator(real, scale)
    data = np.load(qfile)
    queries, truth = data["queries"], data["truth"]
    spec = make_spec(name, n, real.shape[1])
    b = FaissBackend(spec)
    t0 = time.perf_counter()
    train_s = 0.0
    if not b.is_trained:
        ntrain = min(n, max(100_000, 64 * int(spec.nlist or 0)))
        sample = np.concatenate([v for lo, v in gen.gallery(ntrain)])
        t = time.perf_counter()
        b.train(sample)
        train_s = time.perf_counter() - t
        del sample
    add_s = 0.0
    for lo, v in gen.gallery(n):
        t = time.perf_counter()
        b.add(np.arange(lo, lo + len(v)), v)
        add_s += time.perf_counter() - t
    wall = time.perf_counter() - t0
    rows = []
    for var in SETTINGS[name]["variants"]:
        b.set_search(**var)
        b.search(queries[:5], K)  # warm-up
        t = time.perf_counter()
        _, found = b.search(queries, K)
        batched = (time.perf_counter() - t) * 1000 / len(queries)
        times = []
        for i in range(min(timing_q, len(queries))):
            t = time.perf_counter()
            b.search(queries[i:i + 1], K)
            times.append((time.perf_counter() - t) * 1000)
        times = np.asarray(times)
        label = name + "".join(f" {k}={v}" for k, v in var.items())
        rows.append({"setting": label, "factory": FaissBackend.factory_string(spec), "spec": {**spec.to_json(), **var},
                     "bytes_per_image": spec.bytes_per_image, "build_s": round(train_s + add_s, 2), "train_s": round(train_s, 2),
                     "add_s": round(add_s, 2), "build_wall_s": round(wall, 2),
                     "ms_per_query": round(float(np.median(times)), 3), "ms_per_query_p50": round(float(np.median(times)), 3),
                     "ms_per_query_p99": round(float(np.percentile(times, 99)), 3), "ms_per_query_mean": round(float(times.mean()), 3),
                     "ms_per_query_batched": round(batched, 4), "timing_queries": len(times),
                     **recall(found, truth), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
        print(json.dumps({k: rows[-1][k] for k in ("setting", "bytes_per_image", "build_s", "ms_per_query_p50", "ms_per_query_p99",
                                                   "ms_per_query_batched", "recall_at_1", "recall_at_10", "peak_rss_mb")}), flush=True)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, required=True, help="gallery size")
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS, choices=sorted(SETTINGS))
    ap.add_argument("--default-nprobe", type=int, default=None,
                    help="nprobe of the headline (auto) setting; default: auto_spec's own nprobe")
    ap.add_argument("--timing-queries", type=int, default=300, help="single-query timings (p50/p99) over this many queries")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--qfile", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        rows = run_setting(a.worker, a.n, a.scale, a.qfile, a.timing_queries, a.threads)
        Path(a.json).write_text(json.dumps(rows))
        return 0

    t_all = time.perf_counter()
    settings = list(dict.fromkeys(["flat-f32"] + list(a.settings) + (["auto"] if "auto" not in a.settings else [])))
    real = real_descriptors()
    data_model = calibrate(real)
    print(json.dumps(data_model), flush=True)
    gen = Generator(real, data_model["noise_scale"])
    queries, qseeds = gen.queries(a.queries)
    t = time.perf_counter()
    _, truth = exact_topk(gen, a.n, queries)
    gt_s = time.perf_counter() - t
    print(f"exact top-{K} of {a.queries} queries over {a.n}: {gt_s:.1f} s", flush=True)
    table: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        qfile = os.path.join(tmp, "q.npz")
        np.savez(qfile, queries=queries, truth=truth)
        for name in settings:
            out = os.path.join(tmp, f"{name}.json")
            cmd = [sys.executable, __file__, "--worker", name, "--n", str(a.n), "--json", out, "--scale", repr(data_model["noise_scale"]),
                   "--qfile", qfile, "--timing-queries", str(a.timing_queries), "--threads", str(a.threads)]
            t = time.perf_counter()
            r = subprocess.run(cmd)
            if r.returncode != 0:
                table.append({"setting": name, "error": f"exit status {r.returncode}"})
                continue
            table.extend(json.loads(Path(out).read_text()))
            print(f"{name}: {time.perf_counter() - t:.0f} s", flush=True)
    failed = [r["setting"] for r in table if "error" in r]
    if "flat-f32" in failed or all(r["setting"] in failed for r in table if r["setting"].split()[0] == "auto"):
        print(f"scale.py: the setting(s) {', '.join(failed)} failed (their error is printed above); no results written", file=sys.stderr)
        return 1
    flat = next(r for r in table if r["setting"] == "flat-f32")
    from cbir.index.backend import auto_spec

    nprobe = a.default_nprobe or auto_spec("cosine", real.shape[1], a.n).nprobe
    auto_rows = [r for r in table if r["setting"].split()[0] == "auto" and "error" not in r]
    head = next((r for r in auto_rows if r["spec"].get("nprobe") == nprobe), auto_rows[0] if auto_rows else flat)
    res = {"n": a.n, "dim": int(real.shape[1]), "queries": a.queries, "k": K, "threads": a.threads, "setting": head["setting"],
           "factory": head["factory"], "bytes_per_image": head["bytes_per_image"], "recall_at_1": head["recall_at_1"],
           "recall_at_10": head["recall_at_10"], "ms_per_query": head["ms_per_query_p50"], "ms_per_query_p99": head["ms_per_query_p99"],
           "ms_per_query_batched": head["ms_per_query_batched"], "build_s": head["build_s"], "peak_rss_mb": head["peak_rss_mb"],
           "flat_ms_per_query": flat["ms_per_query_p50"], "flat_ms_per_query_batched": flat["ms_per_query_batched"],
           "speedup_vs_flat": round(flat["ms_per_query_p50"] / head["ms_per_query_p50"], 2),
           "speedup_vs_flat_batched": round(flat["ms_per_query_batched"] / head["ms_per_query_batched"], 2),
           "ms_per_query_is": "single-query p50 (one query per search call, 2 threads); batched: all queries in one call / Q",
           "recall_is": f"against exact float32 inner-product search of the same gallery; recall@10 = |top-10 ∩ exact top-10| / 10",
           "data": data_model, "exact_scan_s": round(gt_s, 1), "total_s": round(time.perf_counter() - t_all, 1),
           "table": table}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k not in ("table", "data")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
