"""``cbir serve`` under load on loopback: latency, throughput, memory, and what batching concurrent queries buys.

One ``cbir serve`` process per batch setting (``--max-batch``; 1 = off) is started on 127.0.0.1 (free ports), all
before measuring; then, ``--rounds`` times and alternating between the servers (so that the load other jobs put on a
shared machine falls on every setting alike), for each query set:

* warm single-client latency (one request at a time, p50), with the service's own time split (queue, extract...);
* N concurrent clients x M uploads each (bounded count, and ``--limit-s`` per run): p50/p99 latency, requests/s,
  errors, the mean batch the service formed; server RSS after start-up and after all runs.

Then, in this process, the extractor's own time per image (decoded image -> descriptor, one at a time and the set in
one call), and the wall time of cold ``cbir query`` processes, for the ratios: warm latency / extractor time (what the
service adds) and warm latency / cold process (what keeping it warm saves). Medians over the rounds are reported.

    python benchmarks/serve.py [--index indexes/demo] [--clients 8] [--requests 25] [--batches 1 8] [--rounds 3]
    python benchmarks/serve.py --screenshot benchmarks/results/serve_page.png     # also a picture of the page (chromium)

Writes benchmarks/results/serve.json (one entry per index, ``--key``; other entries are kept). Query sets: ``same`` =
the first 8 demo images by name (as the acceptance check 11-load: astronaut_*, 7 of them 512x512 at the extractor's
side), ``mixed`` = the originals of 8 demo photos (8 different sizes).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
CBIR = str(Path(sys.executable).with_name("cbir"))
DEMO = REPO / "indexes" / "_datasets" / "demo" / "images"


def query_sets():
    files = sorted(glob.glob(str(DEMO / "*.jpg")))
    if not files:
        sys.exit(f"no demo images in {DEMO}: run `make demo` first")
    originals = [f for f in files if f.endswith("_original.jpg")]
    return {"same": files[:8], "mixed": originals[:8]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def pct(values, q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))] if v else float("nan")


def post(url: str, path: str, timeout: float = 120.0):
    """One upload; (client-side seconds, the server's own "seconds" of it, the batch it went in)."""
    b = uuid.uuid4().hex
    data = Path(path).read_bytes()
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() \
        + data + f"\r\n--{b}--\r\n".encode()
    req = urllib.request.Request(url + "/search?top_k=5", data=body, headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    dt = time.perf_counter() - t
    if not out.get("results"):
        raise RuntimeError(f"no results: {str(out)[:200]}")
    return dt, out["seconds"], out.get("batch", 1)


class Server:
    def __init__(self, index: str, threads: int, max_batch: int, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        cmd = [CBIR, "serve", "--index", index, "--host", "127.0.0.1", "--port", str(self.port), "--threads", str(threads),
               "--max-batch", str(max_batch), "--quiet"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() - t0 > 180:
                self.stop()
                sys.exit(f"cbir serve did not start (see {log})")
            time.sleep(0.25)
        self.startup_s = time.monotonic() - t0

    def info(self) -> dict:
        with urllib.request.urlopen(self.url + "/info", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def load_run(url: str, files, clients: int, requests: int, limit_s: float) -> dict:
    lat, server, batch, errs = [], [], [], []
    lock = threading.Lock()
    stop_at = time.monotonic() + limit_s

    def client(i: int) -> None:
        for j in range(requests):
            if time.monotonic() > stop_at:
                return
            try:
                dt, sec, b = post(url, files[(i + j) % len(files)])
                with lock:
                    lat.append(dt)
                    server.append(sec)
                    batch.append(b)
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    errs.append(repr(e)[:200])

    ts = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=limit_s + 150)
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests_each": requests, "answered": len(lat), "errors": len(errs), "error_examples": errs[:3],
            "wall_s": round(wall, 2), "requests_per_s": round(len(lat) / wall, 2) if wall else None,
            "p50_ms": round(pct(lat, 0.50) * 1000, 1), "p99_ms": round(pct(lat, 0.99) * 1000, 1),
            "max_ms": round(max(lat) * 1000, 1) if lat else None, **server_side(server, batch)}


def server_side(server, batch) -> dict:
    """Medians of what the service says it spent per request (queue wait, extractor call, total inside the service)."""
    if not server:
        return {}
    med = {k: round(statistics.median(s.get(k, 0.0) for s in server) * 1000, 1) for k in ("decode", "queue", "extract", "search", "total")}
    return {"server_ms_p50": med, "mean_batch_seen": round(statistics.mean(batch), 2)}


def extractor_time(index: str, files, threads: int, reps: int = 6) -> dict:
    """Seconds per image of the index's own extractor on decoded images: one at a time, and the set in one call."""
    from cbir.data import decode_image
    from cbir.engine import load_index
    from cbir.runtime import set_threads

    set_threads(threads)
    idx = load_index(index)
    ext = idx.extractor
    imgs = [decode_image(f, max_side=ext.max_side) for f in files]
    idx.describe_images(imgs[:1])  # warm-up
    one, batch = [], []
    for _ in range(reps):
        for im in imgs:
            t = time.perf_counter()
            idx.describe_images([im])
            one.append(time.perf_counter() - t)
        t = time.perf_counter()
        idx.describe_images(imgs)
        batch.append((time.perf_counter() - t) / len(imgs))
    t = time.perf_counter()
    for f in files:
        decode_image(f, max_side=ext.max_side)
    dec = (time.perf_counter() - t) / len(files)
    return {"one_at_a_time_s": round(statistics.median(one), 4), "batched_s_per_image": round(statistics.median(batch), 4),
            "decode_s": round(dec, 4), "batch_size": len(imgs)}


def cold_query(index: str, path: str, threads: int, runs: int) -> float:
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([CBIR, "query", "--index", index, path, "--top-k", "5", "--json", "--quiet", "--threads", str(threads)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        walls.append(time.perf_counter() - t)
    return statistics.median(walls)


def screenshot(url: str, query: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium"), headless=True,
                               args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = b.new_page(viewport={"width": 1280, "height": 860})
            page.goto(url + "/", timeout=30_000)
            page.wait_for_function("() => document.getElementById('summary').textContent.includes('images')", timeout=30_000)
            page.fill("#topk", "8")
            page.set_input_files("#file", query)
            page.wait_for_selector("#results .result", timeout=60_000)
            page.wait_for_function("() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
                                   timeout=60_000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            page.locator("#results .result").nth(1).locator("button.why").click()
            page.wait_for_function("() => document.getElementById('match-img').src.startsWith('data:image/png')", timeout=60_000)
            page.wait_for_function("() => document.getElementById('match-img').complete", timeout=30_000)
            page.screenshot(path=str(out.with_name(out.stem + "_match.png")))
        finally:
            b.close()
    for p in (out, out.with_name(out.stem + "_match.png")):
        _shrink_png(p)


def _shrink_png(path: Path) -> None:
    """A screenshot as a 256-colour PNG (a third of the bytes, for the repository)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", default=str(REPO / "indexes" / "demo"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=25, help="uploads per client (default: %(default)s)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="--max-batch settings compared (1: no batching)")
    ap.add_argument("--sets", nargs="+", default=["same", "mixed"], choices=["same", "mixed"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm-requests", type=int, default=16, help="sequential requests for the single-client latency")
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="runs of every setting, alternated; medians are reported (default: %(default)s)")
    ap.add_argument("--limit-s", type=float, default=180.0, help="time bound of each concurrent run")
    ap.add_argument("--screenshot", metavar="PNG", help="also save the page with a query and its results (Playwright + chromium)")
    ap.add_argument("--out", default=str(HERE / "results" / "serve.json"))
    ap.add_argument("--key", help="the entry of the results file written (default: the index folder's name); other entries are kept")
    ap.add_argument("--screenshot-only", action="store_true", help="with --screenshot: only the pictures (serve.json is left as it is)")
    a = ap.parse_args()
    if a.screenshot_only:
        if not a.screenshot:
            sys.exit("--screenshot-only needs --screenshot PNG")
        srv = Server(a.index, a.threads, 1, Path(os.environ.get("TMPDIR", "/tmp")) / "cbir-bench-serve-shot.log")
        try:
            screenshot(srv.url, str(DEMO / "chelsea_rotation.jpg"), Path(a.screenshot))
        finally:
            srv.stop()
        print(f"screenshot: {a.screenshot}")
        return 0
    if a.clients < 1 or a.requests < 1 or a.rounds < 1 or a.clients * a.requests > 2000:
        sys.exit("--clients, --requests and --rounds must be positive, at most 2000 requests per run")
    sets = {k: v for k, v in query_sets().items() if k in a.sets}
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / "cbir-bench-serve"
    logs.mkdir(parents=True, exist_ok=True)
    # one server per batch setting, all started before measuring; the runs alternate between them, round after round, so
    # that the load other jobs put on the machine falls on every setting alike (an idle server waits passively)
    med = statistics.median
    servers = {}
    try:
        for mb in a.batches:
            servers[mb] = Server(a.index, a.threads, mb, logs / f"serve-b{mb}.log")
        rss0 = {mb: rss_mb(srv.proc.pid) for mb, srv in servers.items()}
        runs = []
        for rnd in range(a.rounds):
            order = a.batches if rnd % 2 == 0 else a.batches[::-1]
            for name, files in sets.items():
                for mb in order:
                    srv = servers[mb]
                    before = srv.info()["batches"]
                    warm_runs = [post(srv.url, files[i % len(files)]) for i in range(a.warm_requests)]
                    warm = [w[0] for w in warm_runs]
                    mid = srv.info()["batches"]
                    load = load_run(srv.url, files, a.clients, a.requests, a.limit_s)
                    after = srv.info()["batches"]
                    n_b, n_i = after["batches"] - mid["batches"], after["images"] - mid["images"]
                    run = {"round": rnd, "max_batch": mb, "set": name,
                           "warm_single_client": {"requests": len(warm), "p50_ms": round(pct(warm, 0.5) * 1000, 1),
                                                  "p99_ms": round(pct(warm, 0.99) * 1000, 1),
                                                  **server_side([w[1] for w in warm_runs], [w[2] for w in warm_runs]),
                                                  # per request: what it cost beyond its own extractor call (HTTP, upload, decode, search)
                                                  "beyond_extract_ms_p50": round(med([w[0] - w[1]["extract"] for w in warm_runs]) * 1000, 1),
                                                  "over_extract_p50": round(med([w[0] / max(w[1]["extract"], 1e-6) for w in warm_runs]), 3)},
                           "concurrent": load, "mean_batch": round(n_i / n_b, 2) if n_b else None,
                           "extract_s_per_image_in_service": round((after["extract_s"] - mid["extract_s"]) / max(1, n_i), 4),
                           "rejected": after["rejected"] - before["rejected"]}
                    runs.append(run)
                    print(f"round {rnd} max_batch {mb} set {name}: warm p50 {run['warm_single_client']['p50_ms']} ms; {a.clients} clients: "
                          f"{load['requests_per_s']} req/s, p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, {load['errors']} errors, "
                          f"mean batch {run['mean_batch']}", flush=True)
        rss1 = {mb: rss_mb(srv.proc.pid) for mb, srv in servers.items()}
        startup = {mb: round(srv.startup_s, 2) for mb, srv in servers.items()}
        if a.screenshot:
            try:
                screenshot(servers[a.batches[0]].url, str(DEMO / "chelsea_rotation.jpg"), Path(a.screenshot))
                print(f"screenshot: {a.screenshot}")
            except Exception as e:  # noqa: BLE001 - the figures stand without the picture
                print(f"no screenshot: {e}")
    finally:
        for srv in servers.values():
            srv.stop()

    ext = {name: extractor_time(a.index, files, a.threads) for name, files in sets.items()}
    cold = cold_query(a.index, sets[next(iter(sets))][0], a.threads, a.cold_runs)
    summary = {}
    for name in sets:
        for mb in a.batches:
            rs = [r for r in runs if r["set"] == name and r["max_batch"] == mb]
            summary[f"{name}/max_batch={mb}"] = {
                "rounds": len(rs), "errors": sum(r["concurrent"]["errors"] for r in rs),
                "requests_per_s": round(med(r["concurrent"]["requests_per_s"] for r in rs), 2),
                "p50_ms": round(med(r["concurrent"]["p50_ms"] for r in rs), 1), "p99_ms": round(med(r["concurrent"]["p99_ms"] for r in rs), 1),
                "warm_single_client_p50_ms": round(med(r["warm_single_client"]["p50_ms"] for r in rs), 1),
                "warm_server_extract_ms": round(med(r["warm_single_client"]["server_ms_p50"]["extract"] for r in rs), 1),
                "warm_beyond_extract_ms": round(med(r["warm_single_client"]["beyond_extract_ms_p50"] for r in rs), 1),
                "warm_over_extract": round(med(r["warm_single_client"]["over_extract_p50"] for r in rs), 3),
                "mean_batch": round(med(r["mean_batch"] or 1 for r in rs), 2),
                "server_rss_mb": {"after_start": round(rss0[mb], 1), "after_runs": round(rss1[mb], 1)}, "startup_s": startup[mb]}
    ratios = {}
    for name in sets:
        base = summary[f"{name}/max_batch={a.batches[0]}"]
        warm = base["warm_single_client_p50_ms"] / 1000
        ratios[name] = {"warm_latency_over_extractor": round(warm / ext[name]["one_at_a_time_s"], 2),
                        "warm_latency_over_its_own_extract_call": base["warm_over_extract"],
                        "warm_latency_over_cold_query": round(warm / cold, 4), "cold_query_over_warm_latency": round(cold / warm, 1),
                        "extractor_batched_over_one_at_a_time": round(ext[name]["batched_s_per_image"] / ext[name]["one_at_a_time_s"], 2)}
        for mb in a.batches[1:]:
            other = summary[f"{name}/max_batch={mb}"]
            ratios[name][f"throughput_batch{mb}_over_batch{a.batches[0]}"] = round(other["requests_per_s"] / base["requests_per_s"], 2)
            ratios[name][f"p50_batch{mb}_over_batch{a.batches[0]}"] = round(other["p50_ms"] / base["p50_ms"], 2)
    from cbir.engine import load_index

    m = load_index(a.index).manifest
    parts = [p.get("name") + (f"({p['conf'].get('backbone') or p['conf'].get('local')})" if p.get("conf", {}).get("backbone")
                              or p.get("conf", {}).get("local") else "") for p in m["extractor"]["conf"].get("parts", [])]
    out = {"index": {"folder": os.path.relpath(a.index, REPO), "extractor": m["extractor"]["name"], "parts": parts, "count": m["count"],
                     "dim": m["dim"]},
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "threads": a.threads,
                       "note": "a 2-core machine shared with other jobs: read the ratios, not the absolute values"},
           "workload": {"clients": a.clients, "requests_each": a.requests, "rounds": a.rounds, "warm_requests": a.warm_requests,
                        "sets": {k: [Path(f).name for f in v] for k, v in sets.items()}},
           "summary": summary, "runs": runs, "extractor": ext, "cold_cbir_query_s": round(cold, 3), "ratios": ratios,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        everything = json.loads(path.read_text())
    except (OSError, ValueError):
        everything = {}
    everything[a.key or Path(a.index).name] = out
    path.write_text(json.dumps(everything, indent=2) + "\n")
    print(json.dumps({"summary": summary, "extractor": ext, "cold_cbir_query_s": out["cold_cbir_query_s"], "ratios": ratios}, indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
