"""The build-speed grid: the default pipeline (and every named conf) on real collections, per pixel size and thread count.

Each row is one fresh process (so its peak RSS is its own): it builds an index of the first ``--images`` photos of a
collection with ``index build``'s code (twice, the best kept; the first build's images/s is reported too), then times
the raw network forward alone over the very batches the build made (decoded and shaped beforehand, outside the
clock; best of 2) and decoding alone. Reported per row: build images/s, raw
forward images/s, decode images/s, ``cbir_over_raw_time_ratio`` (build seconds over raw forward seconds) and the
build's peak RSS (MiB; the process's high-water mark right after the build).

Collections: corel1k (384x256), caltech101_objects (~300x200), the Paris photos (paris6k_subset, 1024x768) and
``paris12mp``: the same Paris photos upscaled to 4000x3000 JPEGs in a temporary folder (12 megapixels; made here at
run time, never stored). One more row runs the default build on onnxruntime (``--runtime onnx``; its ratio is over
torch's raw forward, so below 1 means onnxruntime is faster than torch).

    python benchmarks/speed.py --grid                               # the whole grid into speed.json's "grid"
    python benchmarks/speed_grid.py --json /tmp/grid.json --collections corel1k --px 224 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

COLLECTIONS = ("corel1k", "caltech101_objects", "paris6k_subset", "paris12mp")
PIXELS = (224, 320, 512)
THREADS = (1, 2)
#: named confs (cbir.extractors.CONFS) timed on corel1k at their own size, 2 threads
CONF_ROWS = ("mnv2-gap", "mnv2-gap-ms", "mnv2-gem", "aliked-gem", "mnv2-hash")


def _entries(collection: str, n: int, scratch: Path):
    from cbir.data import Entry, load_dataset

    if collection != "paris12mp":
        return load_dataset(collection).gallery[:n]
    import cv2

    out = []
    for e in load_dataset("paris6k_subset").gallery[:n]:
        dst = scratch / (Path(e.path).stem + "_12mp.jpg")
        if not dst.exists():
            img = cv2.imread(str(e.path), cv2.IMREAD_COLOR)
            cv2.imwrite(str(dst), cv2.resize(img, (4000, 3000), interpolation=cv2.INTER_CUBIC), [cv2.IMWRITE_JPEG_QUALITY, 90])
        out.append(Entry(name=dst.name, path=dst, label=e.label))
    return out


def _network(ext):
    """(the backbone that does the work, the scales it runs at) for pooled extractors and what wraps one (hash)."""
    inner = getattr(ext, "base", None) or ext
    return inner, inner.net, list(inner.conf.get("scales") or [1.0])


def child(spec: dict) -> dict:
    """One row, in this process: build, then raw forward and decode on the same images."""
    import numpy as np
    import torch

    from cbir.build import build_index, resolve_extractor, shrink
    from cbir.data import iter_decoded, shape_batches
    from cbir.extractors import CONFS
    from cbir.extractors.batching import scaled_batches, torch_inference
    from cbir.runtime import set_threads

    set_threads(spec["threads"])
    if spec.get("runtime"):
        from cbir.runtime import set_default_runtime

        set_default_runtime(spec["runtime"])  # the build's networks on onnxruntime; the raw forward stays torch's
    scratch = Path(spec["scratch"])
    entries = _entries(spec["collection"], spec["images"], scratch)
    name, conf = spec.get("extractor"), {}
    if name in CONFS:  # a named conf: its extractor and options
        name, conf = CONFS[name]["extractor"], dict(CONFS[name]["conf"])
    if spec.get("px"):
        conf["max_side"] = spec["px"]
    ext = resolve_extractor(name, conf)
    inner, net, scales = _network(ext)
    ext.extract([np.zeros((64, 64, 3), np.uint8)] * 2)  # weights loaded, first calls made
    builds = []  # twice: the first also pays each new input shape's first forward (oneDNN primitives), as a user's does
    for _ in range(2):
        out = Path(tempfile.mkdtemp(prefix="grid-", dir=scratch)) / "index"
        t0 = time.perf_counter()
        build_index(entries, out, extractor=ext, progress=False, log=lambda m: None)
        builds.append(time.perf_counter() - t0)
        shutil.rmtree(out.parent, ignore_errors=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t_build = min(builds)

    t0 = time.perf_counter()
    decoded = list(iter_decoded(entries, ext.max_side, workers=2))
    t_decode = time.perf_counter() - t0
    tensors = []
    with torch_inference():
        for _, item in shape_batches(iter(decoded), 16):
            for _, views in scaled_batches([shrink(img, ext.max_side) for _, _, img in item], scales):
                tensors += views
    raws = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for t in tensors:
                net(t)
        raws.append(time.perf_counter() - t0)
    t_raw = min(raws)
    n = len(entries)
    return {"images": n, "max_side": ext.max_side, "scales": scales, "threads": spec["threads"], "timing": "best of 2",
            "cbir_images_per_s": round(n / t_build, 2), "first_build_images_per_s": round(n / builds[0], 2), "raw_forward_images_per_s": round(n / t_raw, 2),
            "decode_images_per_s": round(n / t_decode, 2), "cbir_over_raw_time_ratio": round(t_build / t_raw, 3),
            "peak_rss_mib": round(peak_mib, 1)}


def _run_child(spec: dict) -> dict:
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], capture_output=True, text=True,
                       cwd=REPO, timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(collections=COLLECTIONS, pixels=PIXELS, threads=THREADS, images: int = 100, confs=CONF_ROWS, onnx: bool = True) -> dict:
    """The grid: {row name: row}, the default pipeline per collection x px x threads, then each named conf."""
    rows = {}
    scratch = Path(tempfile.mkdtemp(prefix="cbir-speed-grid-"))
    try:
        for coll in collections:
            for px in pixels:
                for th in threads:
                    name = f"default {coll} {px}px threads={th}"
                    rows[name] = {"collection": coll, **_run_child({"collection": coll, "px": px, "threads": th, "images": images,
                                                                    "scratch": str(scratch)})}
                    print(f"grid {name}: {rows[name]}", flush=True)
        if onnx:
            name = "default corel1k 512px threads=2 runtime=onnx"
            rows[name] = {"collection": "corel1k", "runtime": "onnx", **_run_child({"collection": "corel1k", "px": 512, "threads": 2,
                                                                                   "images": images, "scratch": str(scratch),
                                                                                   "runtime": "onnx"})}
            print(f"grid {name}: {rows[name]}", flush=True)
        for conf in confs:
            name = f"conf {conf} corel1k threads=2"
            rows[name] = {"collection": "corel1k", "conf_name": conf,
                          **_run_child({"collection": "corel1k", "extractor": conf, "threads": 2, "images": images, "scratch": str(scratch)})}
            print(f"grid {name}: {rows[name]}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"images_per_row": images, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--collections", nargs="+", default=list(COLLECTIONS), choices=COLLECTIONS)
    ap.add_argument("--px", type=int, nargs="+", default=list(PIXELS), help="max_side of the default pipeline's rows")
    ap.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    ap.add_argument("--confs", nargs="*", default=list(CONF_ROWS), help="named confs timed on corel1k (none: --confs)")
    ap.add_argument("--images", type=int, default=100, help="images per row (the first N of each collection)")
    ap.add_argument("--no-onnx", action="store_true", help="skip the row of the default build on onnxruntime")
    ap.add_argument("--json", type=Path, required=False, help="write the grid here as JSON")
    a = ap.parse_args(argv)
    if a.child:
        # this script's folder holds benchmarks/onnx.py, which would shadow the onnx package the exporter imports
        sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != HERE]
        print(json.dumps(child(json.loads(a.child))))
        return 0
    res = run(a.collections, a.px, a.threads, a.images, a.confs, onnx=not a.no_onnx)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
