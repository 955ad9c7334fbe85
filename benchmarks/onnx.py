"""torch vs onnxruntime on this machine's CPU, as ratios in one run (JSON in benchmarks/results/onnx.json).

Every row times the same cbir call with ``runtime="torch"`` and ``runtime="onnx"``, interleaved (torch, onnx, torch,
onnx, ...) so that load from other processes falls on both, and reports medians and ``speedup`` = torch / onnx
seconds (> 1: onnxruntime is faster). Exports happen before timing (their seconds are reported apart).

1. ``pooled``: seconds per image of ``PooledExtractor.extract`` on a batch of real images (corel1k, else the demo set).
2. ``local``: seconds per image of the local features on graf img1 (800x640).
3. ``matchers``: seconds per pair on graf img1/img2 at 512 (re-ranking's default) and 2048 keypoints: LightGlue /
   LighterGlue in torch with kornia's adaptive depth and width (cbir's default), torch without them (the computation
   the ONNX graph does), onnxruntime.
4. ``dense``: seconds per pair of LoFTR and SuperPoint+SuperGlue (random weights in the official layouts; nothing
   ships theirs) at 320x256.

    python benchmarks/onnx.py [--threads 2] [--repeats 5] [--skip-dense]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# this file is named onnx.py: its folder (sys.path[0] when run as a script) would shadow the onnx package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(REPO))
GRAF = REPO.parent / "shared" / "data" / "matching_oxford_affine_graf"

import numpy as np  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each callable, run in turn ``repeats`` times after one warm-up each."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def row(times: dict, per: int = 1, base: str = "torch") -> dict:
    out = {k: round(v / per, 4) for k, v in times.items()}
    for k in times:
        if k != base and k.startswith("onnx"):
            out[f"speedup_{k}"] = round(times[base] / times[k], 2)
    return out


def _gallery(n: int):
    from cbir.data import iter_decoded, load_dataset

    for name in ("corel1k", "demo"):
        try:
            entries = load_dataset(name).gallery[:: 40][:n]
            return name, [img for _, _, img in iter_decoded(entries, 512)]
        except Exception:  # noqa: BLE001 - corel1k may be absent; the demo set is always there
            continue
    raise SystemExit("no dataset available")


def bench_pooled(repeats: int) -> dict:
    from cbir.extractors.pooled import PooledExtractor
    from cbir.export.models.pooled import pooled_identity, pooled_spec
    from cbir.export.runtime import cached_model

    ds, imgs = _gallery(8)
    out = {"dataset": ds, "images": len(imgs), "size": list(imgs[0].shape[:2]), "rows": {}}
    for bb in ("xfeat", "aliked-t16", "aliked-n16", "disk"):
        t_ext, o_ext = PooledExtractor({"backbone": bb, "runtime": "torch"}), PooledExtractor({"backbone": bb, "runtime": "onnx"})
        t0 = time.perf_counter()
        cached_model(pooled_identity(o_ext), lambda: pooled_spec(o_ext))
        export_s = time.perf_counter() - t0
        times = interleaved({"torch": lambda: t_ext.extract(imgs), "onnx": lambda: o_ext.extract(imgs)}, repeats)
        diff = float(np.abs(t_ext.extract(imgs) - o_ext.extract(imgs)).max())
        out["rows"][f"pooled {bb}"] = {**row(times, len(imgs)), "max_abs_diff": diff, "export_s": round(export_s, 2)}
        print(f"pooled {bb}: {out['rows'][f'pooled {bb}']}", flush=True)
    return out


def _graf():
    from cbir.data import decode_image

    if (GRAF / "img1.png").is_file():
        return "graf", decode_image(GRAF / "img1.png"), decode_image(GRAF / "img2.png")
    sys.path.insert(0, str(REPO / "tests" / "local"))
    from conftest import textured_image, warp_pair

    a, b, _ = warp_pair(textured_image(640, 800))
    return "synthetic", a, b


def bench_local(repeats: int) -> dict:
    from cbir.local import build_extractor

    src, im1, _ = _graf()
    out = {"image": src, "size": list(im1.shape[:2]), "rows": {}}
    for name in ("xfeat", "aliked", "disk"):
        t, o = build_extractor(name, runtime="torch"), build_extractor(name, runtime="onnx")
        t0 = time.perf_counter()
        o.extract(im1)  # exports on first use
        export_s = time.perf_counter() - t0
        times = interleaved({"torch": lambda: t.extract(im1), "onnx": lambda: o.extract(im1)}, max(2, repeats // 2) if name == "disk" else repeats)
        out["rows"][f"local {name}"] = {**row(times), "first_call_with_export_s": round(export_s, 2)}
        print(f"local {name}: {out['rows'][f'local {name}']}", flush=True)
    return out


def bench_matchers(repeats: int) -> dict:
    from cbir.local import build_extractor, build_matcher
    from cbir.local.rerank import strongest

    src, im1, im2 = _graf()
    out = {"image": src, "rows": {}}
    for feat, mat in (("xfeat", "lighterglue"), ("aliked", "lightglue")):
        ext = build_extractor(feat, max_keypoints=2048)
        f1, f2 = ext.extract(im1), ext.extract(im2)
        ms = {"torch": build_matcher(mat, features=feat, runtime="torch"),
              "torch_no_pruning": build_matcher(mat, features=feat, runtime="torch", depth_confidence=-1, width_confidence=-1),
              "onnx": build_matcher(mat, features=feat, runtime="onnx")}
        for k in (512, 2048):
            a, b = strongest(f1, k), strongest(f2, k)
            times = interleaved({n: (lambda m=m: m.match(a, b)) for n, m in ms.items()}, repeats)
            r = row(times)
            r["speedup_onnx_vs_no_pruning"] = round(times["torch_no_pruning"] / times["onnx"], 2)
            out["rows"][f"{mat} ({feat}) {k} kp"] = r
            print(f"{mat} ({feat}) {k} kp: {r}", flush=True)
    return out


def bench_dense(repeats: int) -> dict:
    import cv2
    import kornia.feature as KF
    import torch

    from cbir.export.onnx import write_onnx, build_spec
    from cbir.export.runtime import Session
    from cbir.local import build_matcher
    from cbir.models.superglue import SPSG

    src, im1, im2 = _graf()
    a, b = (cv2.resize(im, (320, 256)) for im in (im1, im2))
    out = {"image": src, "size": [256, 320], "weights": "random, official key layouts", "rows": {}}
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        ckpt = Path(d) / "loftr_outdoor.ckpt"
        torch.save({"state_dict": {f"matcher.{k}": v for k, v in KF.LoFTR(pretrained=None).state_dict().items()}}, ckpt)
        mt = build_matcher("loftr", weights=str(ckpt), runtime="torch", match_threshold=0.0)
        mo = build_matcher("loftr", weights=str(ckpt), runtime="onnx", match_threshold=0.0)
        t0 = time.perf_counter()
        mo.match(a, b)
        export_s = time.perf_counter() - t0
        times = interleaved({"torch": lambda: mt.match(a, b), "onnx": lambda: mo.match(a, b)}, repeats)
        out["rows"]["loftr"] = {**row(times), "first_call_with_export_s": round(export_s, 2), "matches": int(len(mo.match(a, b)["scores"]))}
        print(f"loftr: {out['rows']['loftr']}", flush=True)

        sys.path.insert(0, str(REPO / "tests" / "local"))
        from test_loaders import official_superglue_state, official_superpoint_state

        torch.save(official_superpoint_state(), Path(d) / "superpoint_v1.pth")
        torch.save(official_superglue_state(), Path(d) / "superglue_outdoor.pth")
        spec = build_spec("superpoint+superglue", weights=Path(d) / "superpoint_v1.pth", matcher_weights=Path(d) / "superglue_outdoor.pth",
                          conf={"max_keypoints": 1024})
        t0 = time.perf_counter()
        write_onnx(spec, Path(d) / "spsg.onnx")
        export_s = time.perf_counter() - t0
        sess = Session(Path(d) / "spsg.onnx")
        ref = SPSG(spec.module.sp, spec.module.sg).eval()
        g0, g1 = (torch.from_numpy(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)).float()[None, None] / 255 for x in (a, b))

        def run_torch():
            with torch.inference_mode():
                return ref(g0, g1)

        times = interleaved({"torch": run_torch, "onnx": lambda: sess.run({"image0": g0, "image1": g1})}, repeats)
        out["rows"]["superpoint+superglue"] = {**row(times), "export_s": round(export_s, 2)}
        print(f"superpoint+superglue: {out['rows']['superpoint+superglue']}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "onnx.json"))
    a = ap.parse_args()

    from cbir.runtime import set_threads

    set_threads(a.threads)
    import onnxruntime
    import torch

    cache = tempfile.mkdtemp(prefix="cbir_onnx_bench_")
    os.environ["CBIR_ONNX_CACHE"] = cache  # a cold cache: the first-call figures include the export
    t0 = time.time()
    res = {
        "machine": {"cpu_count": os.cpu_count(), "threads": a.threads, "platform": platform.platform(),
                    "load_average_at_start": list(os.getloadavg()), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "repeats": a.repeats,
        "note": "medians of interleaved runs; speedup = torch seconds / onnx seconds (> 1: onnxruntime faster)",
        "pooled": bench_pooled(a.repeats),
        "local": bench_local(a.repeats),
        "matchers": bench_matchers(a.repeats),
    }
    if not a.skip_dense:
        res["dense"] = bench_dense(a.repeats)
    res["machine"]["load_average_at_end"] = list(os.getloadavg())
    res["seconds"] = round(time.time() - t0, 1)
    import shutil

    shutil.rmtree(cache, ignore_errors=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"written {a.out} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
