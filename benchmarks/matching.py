"""Matching benchmark: Oxford graf homographies and ScanNet relative poses (SuperGlue's sample pairs).

    python benchmarks/matching.py                         # graf, all methods -> benchmarks/results/matching_graf.json
    python benchmarks/matching.py --part scannet          # -> benchmarks/results/matching_scannet.json
    python benchmarks/matching.py --methods aliked+lightglue sift+mnn --threads 1

graf: img1 -> imgK, K = 2..6, per method: keypoints, matches, inliers, corner error of the estimated homography
against H1toKp (corners (0,0), (799,0), (799,639), (0,639)), success if < 3 px, seconds per extraction and per match.
Every homography method of :mod:`cbir.local.verify` is scored on the same matches (``--verify``).

scannet: 15 indoor pairs with intrinsics and ground-truth pose; images shrunk to ``--scannet-max-side`` (640, as
SuperGlue evaluates), essential matrix by RANSAC (1 px), AUC of max(R, t) angular error at 5 / 10 / 20 degrees.

The shared data are looked for at ``../shared/data`` from the repository root (or ``$CBIR_SHARED_DATA``); without
them the script says so and exits 0. Threads: ``--threads`` (default 2) and ``OMP_WAIT_POLICY`` (default PASSIVE,
set before torch loads; see DESIGN.md "Threads").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: method name -> (features, extractor conf, matcher, matcher conf)
METHODS: Dict[str, tuple] = {
    "sift+mnn": ("sift", {}, "mnn", {"ratio_threshold": 0.8}),
    "rootsift+mnn": ("rootsift", {}, "mnn", {"ratio_threshold": 0.8}),
    "aliked+lightglue": ("aliked", {}, "lightglue", {}),
    "disk+lightglue": ("disk", {}, "lightglue", {}),
    "xfeat+lighterglue": ("xfeat", {}, "lighterglue", {}),
    "xfeat+mnn": ("xfeat", {}, "mnn", {"distance_threshold": 0.6}),  # cosine > 0.82, XFeat's own MNN setting
}
GRAF_SIZE = (800, 640)
SUCCESS_PX = 3.0


def shared_data() -> Optional[Path]:
    env = os.environ.get("CBIR_SHARED_DATA")
    for p in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if p.is_dir():
            return p
    return None


def build(method: str):
    from cbir.local import build_extractor, build_matcher

    features, fconf, matcher, mconf = METHODS[method]
    t = time.perf_counter()
    ext = build_extractor(features, **fconf)
    m = build_matcher(matcher, features=features, **mconf)
    return ext, m, time.perf_counter() - t


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def run_graf(root: Path, methods: List[str], verify_methods: List[str]) -> Dict[str, Any]:
    import numpy as np

    from cbir.data import decode_image
    from cbir.local.base import correspondences
    from cbir.local.verify import corner_error, verify

    images = {k: decode_image(root / f"img{k}.png") for k in range(1, 7)}
    gts = {k: np.loadtxt(root / f"H1to{k}p") for k in range(2, 7)}
    results: Dict[str, Any] = {}
    for method in methods:
        ext, m, t_build = build(method)
        f1, t1 = timed(ext.extract, images[1])
        rows = []
        for k in range(2, 7):
            fk, t_ext = timed(ext.extract, images[k])
            res, t_match = timed(m.match, f1, fk)
            c = correspondences(f1, fk, res)
            row: Dict[str, Any] = {
                "K": k,
                "keypoints0": int(len(f1["keypoints"])),
                "keypoints1": int(len(fk["keypoints"])),
                "matches": int(len(c["keypoints0"])),
                "extract_seconds": round(t_ext, 3),
                "match_seconds": round(t_match, 3),
            }
            for vm in verify_methods:
                v, t_v = timed(lambda: verify(c["keypoints0"], c["keypoints1"], "homography", method=vm))
                err = corner_error(v.matrix, gts[k], *GRAF_SIZE)
                row[vm] = {
                    "inliers": v.score,
                    "corner_error": None if not np.isfinite(err) else round(err, 3),
                    "success": bool(err < SUCCESS_PX),
                    "verify_seconds": round(t_v, 4),
                }
            rows.append(row)
            print(f"{method:18s} K={k} kp={row['keypoints0']}/{row['keypoints1']} matches={row['matches']:5d} "
                  + " ".join(f"{vm}: {row[vm]['inliers']:4d} inl {row[vm]['corner_error']} px" for vm in verify_methods)
                  + f"  extract {t_ext:.2f}s match {t_match:.2f}s", flush=True)
        ext_times = [t1] + [r["extract_seconds"] for r in rows]
        results[method] = {
            "build_seconds": round(t_build, 3),
            "extract_seconds_mean": round(float(np.mean(ext_times)), 3),
            "match_seconds_mean": round(float(np.mean([r["match_seconds"] for r in rows])), 3),
            "solved": {vm: [r["K"] for r in rows if r[vm]["success"]] for vm in verify_methods},
            "pairs": rows,
        }
    return results


def read_scannet_pairs(root: Path):
    import numpy as np

    pairs = []
    for line in (root / "scannet_sample_pairs_with_gt.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) < 38:
            continue
        nums = np.array(parts[2:], np.float64)
        pairs.append({
            "name0": parts[0], "name1": parts[1],
            "K0": nums[2:11].reshape(3, 3), "K1": nums[11:20].reshape(3, 3), "T_0to1": nums[20:36].reshape(4, 4),
        })
    return pairs


def run_scannet(root: Path, methods: List[str], max_side: int) -> Dict[str, Any]:
    import numpy as np

    from cbir.data import decode_image, resize_max_side
    from cbir.local.base import correspondences
    from cbir.local.pose import estimate_relative_pose, pose_errors, summarize

    pairs = read_scannet_pairs(root)
    img_dir = root / "scannet_sample_images"
    cache: Dict[str, Any] = {}

    def load(name):
        if name not in cache:
            full = decode_image(img_dir / name)
            small = resize_max_side(full, max_side)
            s = np.array([small.shape[1] / full.shape[1], small.shape[0] / full.shape[0]])
            cache[name] = (small, s)
        return cache[name]

    def scaled_K(K, s):
        S = np.diag([s[0], s[1], 1.0])
        return S @ K

    results: Dict[str, Any] = {}
    for method in methods:
        ext, m, t_build = build(method)
        errs, rows, t_ext_all, t_match_all = [], [], [], []
        feats: Dict[str, Any] = {}
        for p in pairs:
            for name in (p["name0"], p["name1"]):
                if name not in feats:
                    feats[name], t = timed(ext.extract, load(name)[0])
                    t_ext_all.append(t)
            f0, f1 = feats[p["name0"]], feats[p["name1"]]
            res, t_m = timed(m.match, f0, f1)
            t_match_all.append(t_m)
            c = correspondences(f0, f1, res)
            K0 = scaled_K(p["K0"], load(p["name0"])[1])
            K1 = scaled_K(p["K1"], load(p["name1"])[1])
            est = estimate_relative_pose(c["keypoints0"], c["keypoints1"], K0, K1, threshold=1.0)
            R, t, inl = est if est is not None else (None, None, None)
            e_R, e_t = pose_errors(p["T_0to1"], R, t)
            errs.append(max(e_R, e_t))
            rows.append({"pair": f"{p['name0']} {p['name1']}", "matches": int(len(c["keypoints0"])),
                         "inliers": int(inl.sum()) if inl is not None else 0,
                         "err_R": None if not np.isfinite(e_R) else round(e_R, 3), "err_t": None if not np.isfinite(e_t) else round(e_t, 3)})
        s = summarize(errs)
        print(f"{method:18s} AUC@5/10/20 = {s['auc@5']:.1f} / {s['auc@10']:.1f} / {s['auc@20']:.1f}  "
              f"extract {np.mean(t_ext_all):.2f}s match {np.mean(t_match_all):.2f}s", flush=True)
        results[method] = {**{k: round(v, 2) for k, v in s.items()}, "build_seconds": round(t_build, 3),
                           "extract_seconds_mean": round(float(np.mean(t_ext_all)), 3),
                           "match_seconds_mean": round(float(np.mean(t_match_all)), 3), "pairs": rows}
    return results


def environment(threads: int) -> Dict[str, Any]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "threads": threads,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "cpu_count": os.cpu_count(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["graf", "scannet", "all"], default="graf")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--verify", nargs="+", default=["accurate", "magsac"], help="homography methods scored on graf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--omp-wait-policy", default="PASSIVE")
    ap.add_argument("--scannet-max-side", type=int, default=640)
    ap.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    data = shared_data()
    if data is None:
        print(f"shared data not found at {REPO.parent / 'shared' / 'data'} (or $CBIR_SHARED_DATA): nothing to benchmark")
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", args.omp_wait_policy)
    import torch

    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(args.threads)
    if args.part in ("graf", "all"):
        root = data / "matching_oxford_affine_graf"
        if not (root / "img1.png").is_file():
            print(f"{root}: graf images not found, skipping")
        else:
            res = run_graf(root, args.methods, args.verify)
            out = args.out_dir / "matching_graf.json"
            out.write_text(json.dumps({"dataset": os.path.relpath(root, REPO), "success_px": SUCCESS_PX, "environment": env, "methods": res}, indent=1))
            print(f"wrote {out}")
    if args.part in ("scannet", "all"):
        root = data / "matching_superglue_assets"
        if not (root / "scannet_sample_pairs_with_gt.txt").is_file():
            print(f"{root}: ScanNet pairs not found, skipping")
        else:
            res = run_scannet(root, args.methods, args.scannet_max_side)
            out = args.out_dir / "matching_scannet.json"
            out.write_text(json.dumps({"dataset": os.path.relpath(root, REPO), "max_side": args.scannet_max_side, "environment": env, "methods": res}, indent=1))
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
