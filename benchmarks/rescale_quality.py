"""The default pipeline's second scale made from uint8 pixels (today) against the same filter on float pixels
(until 2026-12): retrieval quality on every labelled collection of the suite, descriptor cosines, rescale time.

    python benchmarks/rescale_quality.py [--collections corel1k ukbench56 ...] [--json benchmarks/results/rescale_quality.json]

Both variants build the default index of each collection in process (``build_index``, what ``cbir index build
--dataset NAME`` runs) and are evaluated with ``cbir.eval.evaluate`` (what ``cbir eval`` runs: leave-one-out, the
index's graph stage). ``float`` swaps :func:`cbir.extractors.batching.scaled_batches` for the earlier code: the batch
converted to float first, then ``F.interpolate(bilinear, antialias)``. The bar (issue 23): P@10 and mAP within 0.003
on every collection. The rescale timing is one corel1k-sized batch (10 x 384 x 256) at 0.707, best of 20.
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
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # benchmarks/onnx.py would shadow onnx
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

COLLECTIONS = ("corel1k", "ukbench56", "boofcv24", "caltech101_objects", "paris6k_subset")
BAR = 0.003


def float_scaled_batches(images, scales=(1.0,), flip=False, max_pixels=None):
    """The earlier rescaling: float [0, 1] batch first, then the antialiased bilinear filter on floats."""
    import torch.nn.functional as F

    from cbir.extractors.batching import MAX_BATCH_PIXELS, images_to_batches

    for sub, batch in images_to_batches(images, max_pixels or MAX_BATCH_PIXELS):
        views = []
        for s in scales:
            b = batch if float(s) == 1.0 else F.interpolate(batch, scale_factor=float(s), mode="bilinear", align_corners=False,
                                                             antialias=float(s) < 1)
            views += [b, b.flip(-1)] if flip else [b]
        yield sub, views


def rescale_ms() -> dict:
    import torch

    from cbir.extractors import batching

    rng = np.random.default_rng(0)
    imgs = list(rng.integers(0, 256, (10, 256, 384, 3), dtype=np.uint8))
    out = {}
    with torch.inference_mode():
        for name, fn in (("uint8", batching.scaled_batches), ("float", float_scaled_batches)):
            best = float("inf")
            for _ in range(20):
                t0 = time.perf_counter()
                for _ in fn(imgs, (1.0, 0.707)):
                    pass
                best = min(best, time.perf_counter() - t0)
            out[name] = round(best * 1000, 2)
        a = next(batching.scaled_batches(imgs, (0.707,)))[1][0]
        b = next(float_scaled_batches(imgs, (0.707,)))[1][0]
    out["max_abs_difference_grey_levels"] = round(float((a - b).abs().max()) * 255, 3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--collections", nargs="+", default=list(COLLECTIONS), metavar="NAME")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "rescale_quality.json")
    args = ap.parse_args(argv)

    import cbir.extractors.pooled as pooled
    from cbir.build import build_index, resolve_extractor
    from cbir.data import load_dataset
    from cbir.engine import Index
    from cbir.eval.evaluate import evaluate
    from cbir.runtime import set_threads

    set_threads(2)
    t_start = time.time()
    res = {"rescale_ms_per_batch_two_scales": rescale_ms(), "collections": {}, "bar": f"|delta P@10|, |delta mAP| <= {BAR}"}
    print(json.dumps(res["rescale_ms_per_batch_two_scales"]), flush=True)
    uint8 = pooled.scaled_batches
    tmp = Path(tempfile.mkdtemp(prefix="cbir-rescale-"))
    try:
        for ds in args.collections:
            entries = load_dataset(ds).gallery
            row, descs = {"images": len(entries)}, {}
            for name, fn in (("uint8", uint8), ("float", float_scaled_batches)):
                pooled.scaled_batches = fn
                try:
                    folder = tmp / f"{ds}-{name}"
                    t0 = time.time()
                    build_index(entries, folder, extractor=resolve_extractor(None), progress=False, log=lambda m: None)
                    build_s = time.time() - t0
                    m = evaluate(folder, dataset=ds, progress=False)["metrics"]
                finally:
                    pooled.scaled_batches = uint8
                idx = Index(folder)
                descs[name] = dict(zip(map(str, idx.names), np.asarray(idx.descriptors, np.float32)))
                row[name] = {"p@10": round(m["precision@10"], 4), "map": round(m["map"], 4), "build_s_single_run": round(build_s, 1)}
                if m.get("ns_score") is not None:
                    row[name]["ns_score"] = round(m["ns_score"], 4)
                shutil.rmtree(folder, ignore_errors=True)
            names = sorted(descs["uint8"])
            a = np.stack([descs["uint8"][n] for n in names])
            b = np.stack([descs["float"][n] for n in names])
            cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            row["descriptor_cosine"] = {"min": round(float(cos.min()), 6), "mean": round(float(cos.mean()), 6)}
            row["delta"] = {k: round(row["uint8"][k] - row["float"][k], 4) for k in row["uint8"] if k != "build_s_single_run"}
            row["within_bar"] = all(abs(v) <= BAR for k, v in row["delta"].items() if k != "ns_score")
            res["collections"][ds] = row
            print(ds, json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res["within_bar_everywhere"] = all(r["within_bar"] for r in res["collections"].values())
    res["seconds"] = round(time.time() - t_start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {args.json}: within the bar everywhere: {res['within_bar_everywhere']} ({res['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
