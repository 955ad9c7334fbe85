"""Memory of dense class maps (seed 004): K=1000 classes upsampled to 2048x2048, naive vs chunked vs pruned.

Every case runs in its own process so its peak RSS (``ru_maxrss``) is its own; the parent collects one
JSON line per case and writes ``benchmarks/results/fcn_memory.json``.

Cases (coarse grid 64x64 = stride 32 at 2048x2048):

* ``naive``: every class map upsampled at once (``upsample_bilinear``, the transposed convolution), then
  the argmax. Measured at K = 25, 50, 100 and extrapolated linearly to K=1000 (~16 GiB of output alone,
  more than a shared 23 GiB machine should be asked for); a K=1000 attempt runs under an address-space
  cap so that it fails instead of swapping the machine.
* ``chunked``: ``upsample_class_scores`` (32 classes at a time, running argmax), K=1000, every class.
* ``pruned``: ``argmax_upsample`` (softmax, exact pruning of the classes that cannot win, then chunked),
  on random logits (pruning can drop little) and on structured logits (8 regions, each won by one class).
* ``class_map``: end to end on a 2048x2048 photo with a K=1000 head on the default base (pooled ALIKED +
  colour; random weights): at full resolution (``--full-res``: ALIKED on 2048x2048) and at the head's
  512-px analysis size upsampled by 128.

    .venv/bin/python benchmarks/fcn_memory.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "fcn_memory.json"
SIZE = 2048
STRIDE = 32
GIB = 1 << 30


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _scores(K: int, kind: str, h: int, w: int):
    import torch

    g = torch.Generator().manual_seed(0)
    s = torch.randn(K, h, w, generator=g)
    if kind == "structured":  # 8 regions (blocks of 16x16 cells), each won clearly by one class
        reg = torch.randint(0, 8, (h // 16 + 1, w // 16 + 1), generator=g).repeat_interleave(16, 0).repeat_interleave(16, 1)[:h, :w]
        cls = reg * (K // 8)
        s[cls, torch.arange(h)[:, None], torch.arange(w)[None]] += 8.0
    return s


def child(case: str, K: int, kind: str, cap_gib: float) -> dict:
    import torch

    torch.set_num_threads(2)
    from cbir.extractors.upsample import (argmax_upsample, prune_classes, upsample_bilinear, upsample_class_scores,
                                          upsample_memory_bytes)

    h = w = SIZE // STRIDE
    out = {"case": case, "K": K, "scores": kind, "size": [SIZE, SIZE], "grid": [h, w]}
    if case == "class_map":
        return child_class_map(K, kind, out)
    s = _scores(K, kind, h, w)
    base = _rss_now()
    if cap_gib:
        cap = int(cap_gib * GIB)
        vm = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (vm + cap, vm + cap))
        out["address_space_cap_gib_above_start"] = cap_gib
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            if case == "naive":
                up = upsample_bilinear(s.unsqueeze(0), STRIDE)[0]
                conf, labels = up.max(0)
                del up
                out["estimate_bytes"] = upsample_memory_bytes(K, SIZE, SIZE, chunk=None)
            elif case == "chunked":
                labels, conf = upsample_class_scores(s, STRIDE, chunk=32)
                out["estimate_bytes"] = upsample_memory_bytes(K, SIZE, SIZE, chunk=32)
            elif case == "pruned":
                kept = len(prune_classes(torch.softmax(s, 0)))
                labels, conf = argmax_upsample(s, STRIDE, chunk=32, softmax=True, prune=True)
                out["classes_upsampled"] = kept
                out["estimate_bytes"] = upsample_memory_bytes(kept, SIZE, SIZE, chunk=32)
            else:
                raise SystemExit(f"unknown case {case}")
        out["ok"] = True
        out["labels_shape"] = list(labels.shape)
        out["distinct_labels"] = int(torch.unique(labels).numel())
    except (MemoryError, RuntimeError) as e:
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {str(e)[:160]}"
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["baseline_rss_bytes"] = base
    out["peak_rss_bytes"] = _rss_peak()
    out["peak_above_baseline_bytes"] = out["peak_rss_bytes"] - base
    return out


def child_class_map(K: int, full_res: str, out: dict) -> dict:
    import cv2
    import numpy as np
    import torch

    from cbir.data import decode_image
    from cbir.extractors import HEAD_BASE_PARTS
    from cbir.extractors.classmap import ClassMapper

    rng = np.random.default_rng(0)
    D = 240 + 256  # pooled ALIKED-n16 blocks + colour 16x4x4
    head = {"classes": [f"c{i:04d}" for i in range(K)], "label_names": {},
            "base": {"name": "fused", "conf": {"parts": HEAD_BASE_PARTS, "max_side": 512}},
            "mean": np.full(D, 0.04, np.float32), "std": np.full(D, 0.03, np.float32),
            "layers": [(rng.normal(0, 0.05, (K, D)).astype(np.float32), np.zeros(K, np.float32))]}
    corel = REPO.parent / "shared" / "data" / "category_wang_corel1k" / "images" / "0.jpg"
    img = decode_image(corel) if corel.is_file() else (rng.random((384, 256, 3)) * 255).astype(np.uint8)
    img = cv2.resize(img, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    mapper = ClassMapper(head)
    mapper.base.parts[0].net  # load the backbone before the baseline
    analyse = full_res != "full-res"
    base = _rss_now()
    t0 = time.perf_counter()
    labels, conf, info = mapper.class_map(img, analyse=analyse, chunk=32)
    out.pop("grid")
    out.update({"scores": full_res, "ok": True, "seconds": round(time.perf_counter() - t0, 2), "info": info,
                "labels_shape": list(labels.shape), "distinct_labels": int(len(np.unique(labels))),
                "baseline_rss_bytes": base, "peak_rss_bytes": _rss_peak()})
    out["peak_above_baseline_bytes"] = out["peak_rss_bytes"] - base
    return out


CASES = [
    ("naive", 25, "random", 0),
    ("naive", 50, "random", 0),
    ("naive", 100, "random", 0),
    ("naive", 1000, "random", 6.0),
    ("chunked", 1000, "random", 0),
    ("pruned", 1000, "random", 0),
    ("pruned", 1000, "structured", 0),
    ("class_map", 1000, "analysed-512", 0),
    ("class_map", 1000, "full-res", 0),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("CASE", "K", "SCORES", "CAP_GIB"), help=argparse.SUPPRESS)
    ap.add_argument("--only", nargs="*", help="run only these case names")
    a = ap.parse_args()
    if a.child:
        case, K, kind, cap = a.child
        print("RESULT " + json.dumps(child(case, int(K), kind, float(cap))), flush=True)
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "2"}
    results = []
    for case, K, kind, cap in CASES:
        if a.only and case not in a.only:
            continue
        p = subprocess.run([sys.executable, __file__, "--child", case, str(K), kind, str(cap)], capture_output=True, text=True, env=env)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            r = {"case": case, "K": K, "scores": kind, "ok": False, "returncode": p.returncode, "error": (p.stderr or "")[-300:]}
        else:
            r = json.loads(line[7:])
        results.append(r)
        peak = r.get("peak_rss_bytes")
        print(f"{case:10s} K={K:5d} {kind:13s} ok={r.get('ok')} peak RSS {peak / GIB if peak else float('nan'):6.2f} GiB "
              f"(+{(r.get('peak_above_baseline_bytes') or 0) / GIB:5.2f}) {r.get('seconds', '-')} s "
              f"{r.get('error', '')}", flush=True)
    naive = [r for r in results if r["case"] == "naive" and r.get("ok") and r["K"] < 1000]
    fit = None
    if len(naive) >= 2:
        import numpy as np

        ks = np.array([r["K"] for r in naive], float)
        ys = np.array([r["peak_above_baseline_bytes"] for r in naive], float)
        slope, icpt = np.polyfit(ks, ys, 1)
        fit = {"bytes_per_class": round(float(slope)), "intercept_bytes": round(float(icpt)),
               "extrapolated_K1000_gib": round(float((slope * 1000 + icpt) / GIB), 2),
               "bytes_per_class_per_pixel": round(float(slope) / SIZE**2, 2)}
    report = {
        "what": "peak RSS (ru_maxrss, one process per case) of upsampling K coarse class maps (64x64, stride 32) to 2048x2048 "
                "and taking the per-pixel argmax; peak_above_baseline = peak minus the RSS just before the upsampling",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(), "torch_threads": 2},
        "limit_target_gib": 2.0,
        "cases": results,
        "naive_linear_fit": fit,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
