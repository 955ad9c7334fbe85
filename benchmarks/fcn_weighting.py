"""Foreground-weighted pooling by a semantic head's class map (seed 004), measured on Corel-1k.

The head is trained on the *train* split (first half of each class, ``cbir.engine.train_head``, default
base: GeM over ALIKED-n16 + HSV colour); retrieval is evaluated on the disjoint *test* split,
leave-one-out (every test image queries the other 499): precision@10 and mAP for ``pooled`` (GeM over
ALIKED-n16's blocks) without weighting and with each weighting mode, and the head's own softmax
(``semantic``) for reference. A diagnostic reports how often
the class map's cells agree with the image's label (test split) for several neighbourhood windows.

Indexes and the head live in ``indexes/fcn/`` (git-ignored) and are reused by later runs.

    .venv/bin/python benchmarks/fcn_weighting.py          # ~8 minutes on 2 busy cores the first time
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "indexes" / "fcn"
OUT = REPO / "benchmarks" / "results" / "fcn_weighting.json"

#: name -> (extractor, weighting spec or None, index folder under indexes/fcn)
VARIANTS = {
    "pooled": ("pooled", None, "test_pooled"),
    "pooled+predicted (window 1, default)": ("pooled", {"mode": "predicted", "window": 1}, "test_pooled_predicted-w1"),
    "pooled+predicted (window 3)": ("pooled", {"mode": "predicted", "window": 3}, "test_pooled_predicted"),
    "pooled+confidence (window 3)": ("pooled", {"mode": "confidence", "window": 3}, "test_pooled_confidence"),
    "semantic (the head's softmax, reference)": ("semantic", None, "test_semantic"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), help="names of VARIANTS (default: all)")
    ap.add_argument("--no-diagnostic", action="store_true")
    a = ap.parse_args()

    import cbir
    from cbir.engine import build_index, evaluate, train_head
    from cbir.runtime import set_threads

    set_threads(a.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    train = cbir.load_dataset("corel1k", split="train")
    test = cbir.load_dataset("corel1k", split="test")
    head = WORK / "head_corel_train.h5"
    t0 = time.time()
    head_info = None
    if not head.is_file():
        head_info = train_head(train.gallery, head, progress=False, label_names=train.label_names)
    seconds = {"train_head": round(time.time() - t0, 1)}

    results = {}
    for name in a.variants:
        extractor, w, folder = VARIANTS[name]
        conf = {"head": str(head)} if extractor == "semantic" else {} if w is None else {"weighting": {"head": str(head), **w}}
        out = WORK / folder
        t0 = time.time()
        rep = build_index(test.gallery, out, extractor=extractor, conf=conf, progress=False, workers=1)
        t_build = time.time() - t0
        ev = evaluate(out, progress=False)
        m = ev["metrics"]
        results[name] = {"extractor": extractor, "weighting": w, "index": str(out.relative_to(REPO)), "images": rep.count,
                         "p@10": round(m["precision@10"], 4), "map": round(m["map"], 4),
                         "p@1": round(m["precision@1"], 4), "p@5": round(m["precision@5"], 4),
                         "seconds_build": round(t_build, 1), "extracted": rep.extracted, "reused": rep.reused}
        print(f"{name:42s} P@10 {results[name]['p@10']:.4f}  mAP {results[name]['map']:.4f}  "
              f"(build {t_build:.0f} s, {rep.extracted} extracted)", flush=True)

    diagnostic = None if a.no_diagnostic else cell_agreement(head, test)
    report = {
        "what": "corel1k: semantic head trained on the train split (500 images + flips); pooled (GeM over ALIKED-n16 blocks) "
                "retrieval on the test split (500 images, leave-one-out), without and with foreground weighting by the "
                "head's class map",
        "head": {"file": str(head.relative_to(REPO)), "base": "fused(pooled aliked-n16, colour)", **(head_info or {})},
        "results": results,
        "cell_agreement": diagnostic,
        "seconds": seconds,
        "threads": a.threads,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


def cell_agreement(head: Path, test) -> dict:
    """Per window: share of grid cells whose argmax is the image's label, and image accuracy of the global output."""
    import torch

    from cbir.data import iter_decoded
    from cbir.extractors.classmap import ClassMapper
    from cbir.extractors.batching import images_to_batches

    mapper = ClassMapper(str(head))
    part = next(e for e, _ in mapper.parts if e.name == "pooled")
    windows = {"1": 1, "3": 3, "5": 5, "global": None}
    hits = {k: 0 for k in windows}
    cells = 0
    img_hits = 0
    fg_prob = []
    t0 = time.time()
    for _, e, img in iter_decoded(test.gallery, mapper.max_side, workers=1):
        if not isinstance(img, np.ndarray):
            continue
        target = mapper.classes.index(str(e.label))
        with torch.inference_mode():
            maps = part.maps(next(images_to_batches([img]))[1])
            descs, _ = mapper.descriptors_for_windows([img], list(windows.values()), maps=maps)
            for (k, w), desc in zip(windows.items(), descs):
                logits = mapper.apply_head(desc)[0]
                pred = logits.argmax(0)
                hits[k] += int((pred == target).sum())
                if w is None:
                    img_hits += int(pred[0, 0] == target)
                if k == "3":
                    fg_prob.append(float(torch.softmax(logits, 0)[target].mean()))
        cells += int(pred.numel())
    n = len(fg_prob)
    return {"images": n, "cells": cells,
            "cell_accuracy": {k: round(v / cells, 4) for k, v in hits.items()},
            "image_accuracy_global": round(img_hits / n, 4),
            "mean_probability_of_true_class_window3": round(float(np.mean(fg_prob)), 4),
            "seconds": round(time.time() - t0, 1),
            "note": "cell_accuracy['global'] equals the image accuracy (every cell gets the whole-image descriptor)"}


if __name__ == "__main__":
    main()
