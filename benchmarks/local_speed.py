"""Seconds per image of every ``--local`` option at its defaults, on real 1024x768 photos (the Paris subset).

For each option the same photos are built twice in one process, once with ``index build``'s code and ``--local NAME``
and once without, alternating (best of ``--repeats`` of each); the local part costs the difference, per image.
Named confs (``default``, ``rootsift-256-fp16``, ``xfeat-compact``) and every local extractor (xfeat, aliked, disk,
sift, rootsift, ...) are timed; also the bytes per image of local.h5.

    python benchmarks/local_speed.py [--images 12] [--repeats 2] [--json benchmarks/results/local_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--images", type=int, default=12, help="Paris photos timed (1024 px on the long side)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="+", help="time only these options")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "local_speed.json")
    a = ap.parse_args(argv)

    import cv2

    from cbir.build import build_index, resolve_extractor
    from cbir.data import load_dataset
    from cbir.local import extractor_names
    from cbir.local.confs import local_names
    from cbir.runtime import set_threads

    set_threads(a.threads)
    entries = load_dataset("paris6k_subset").gallery[: a.images]
    sizes = sorted({cv2.imread(str(e.path)).shape[:2] for e in entries})
    names = a.only or (local_names() + [n for n in extractor_names() if n not in local_names()])
    ext = resolve_extractor(None)
    tmp = Path(tempfile.mkdtemp(prefix="cbir-local-speed-"))
    rows = {}
    try:
        def build(local):
            out = tmp / f"i{time.monotonic_ns()}"
            t0 = time.perf_counter()
            build_index(entries, out, extractor=ext, local=local, progress=False, log=lambda m: None)
            dt = time.perf_counter() - t0
            size = (out / "local.h5").stat().st_size if (out / "local.h5").exists() else 0
            shutil.rmtree(out, ignore_errors=True)
            return dt, size

        build(None)  # warm-up: the global network loaded, first shapes seen
        for name in names:
            try:
                build(name)  # warm-up of this option's network
                best_with = best_without = float("inf")
                size = 0
                for _ in range(a.repeats):
                    t, size = build(name)
                    best_with = min(best_with, t)
                    best_without = min(best_without, build(None)[0])
                n = len(entries)
                rows[name] = {"seconds_per_image": round(max(0.0, best_with - best_without) / n, 4),
                              "build_seconds_per_image_with": round(best_with / n, 4),
                              "build_seconds_per_image_without": round(best_without / n, 4),
                              "local_h5_bytes_per_image": int(size / n)}
            except Exception as e:  # noqa: BLE001 - one option failing (e.g. weights not installed) is a row, not the end
                rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            print(f"local {name}: {rows[name]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"dataset": "paris6k_subset", "images": len(entries), "image_sizes_hw": [list(s) for s in sizes],
           "threads": a.threads, "timing": f"best of {a.repeats}, with and without alternating", "rows": rows,
           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
