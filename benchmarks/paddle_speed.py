"""Paddle vs torch MobileNetV2 on this machine, side by side and as ratios in one run
(JSON in benchmarks/results/paddle_speed.json).

The same weights run three ways: Paddle eager (``paddle:mobilenet_v2``, what ``pooled`` runs), the
``paddle.jit.save``d program (``paddle-jit:PREFIX``, what ``semantic`` runs) and cbir's torch MobileNetV2
with the converted state dict (``cbir convert paddle-to-torch``). The model is a random-initialised
12-class MobileNetV2, BN statistics calibrated on 8 of the images (nothing is downloaded; speed does not
depend on the values, parity is measured on features that do depend on the image). Inputs are real images
resized to 227x227 as seed 003 does. Rows:

* ``forward``: images/s of the network alone on ready tensors, batch 1 and 32; the engines alternate
  within each repeat and the median repeat is kept, so a busy shared machine slows all of them alike.
* ``extractor``: images/s of cbir's ``pooled`` extractor on decoded images (resize + network + pooling),
  batch 32, Paddle backbone vs the torch backbone with the seed's preprocessing.
* ``parity``: max relative difference of the pooled features and logits (Paddle vs converted torch).

    python benchmarks/paddle_speed.py [--images 64] [--threads 2] [--repeats 3]
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
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GLOG_minloglevel", "2")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def _images(n: int):
    from cbir.data import iter_decoded, load_dataset

    for name in ("corel1k", "boofcv24", "demo"):
        try:
            entries = load_dataset(name).gallery[:n]
        except Exception:  # noqa: BLE001 - shared data may be absent; the demo set is always there
            continue
        imgs = [img for _, _, img in iter_decoded(entries, None)]
        while len(imgs) < n:
            imgs = imgs + imgs[: n - len(imgs)]
        return name, imgs
    raise SystemExit("no dataset available")


def _model(tmp: Path, imgs):
    """A random 12-class MobileNetV2 with BN statistics calibrated on a few images (so features depend on the image)."""
    import paddle
    from paddle.vision.models import mobilenet_v2

    from cbir.extractors.batching import resize_to

    paddle.seed(0)
    rng = np.random.default_rng(0)
    m = mobilenet_v2(num_classes=12)
    m.set_state_dict({k: (rng.normal(0, 0.1, v.shape) if k == "classifier.1.weight" else v.numpy()).astype(np.float32)
                      for k, v in m.state_dict().items()})
    for layer in m.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer._momentum = 0.0
    x = np.stack(resize_to(imgs[:8], (227, 227))).astype(np.float32).transpose(0, 3, 1, 2) / 255
    x = (x - np.float32([0.485, 0.456, 0.406])[:, None, None]) / np.float32([0.229, 0.224, 0.225])[:, None, None]
    m.train()
    with paddle.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m(paddle.to_tensor(x))
    m.eval()
    pdparams = tmp / "m.pdparams"
    paddle.save(m.state_dict(), str(pdparams))
    prefix = tmp / "jit" / "m"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paddle.jit.save(m, str(prefix), input_spec=[paddle.static.InputSpec([None, 3, 227, 227], "float32")])
    return pdparams, prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(HERE / "results" / "paddle_speed.json"))
    a = ap.parse_args()

    import paddle
    import torch

    from cbir.extractors import make_extractor
    from cbir.extractors.batching import images_to_batches, resize_to
    from cbir.runtime import set_threads
    from cbir.models.backbones import build_backbone
    from cbir.models.mobilenetv2 import MobileNetV2
    from cbir.models.paddle import paddle_to_torch_state, torch_parity

    set_threads(a.threads)
    ds, imgs = _images(a.images)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        pdparams, prefix = _model(tmp, imgs)
        state, _ = paddle_to_torch_state(pdparams)
        pth = tmp / "m.pth"
        torch.save(state, pth)
        eager = build_backbone("paddle:mobilenet_v2", weights=str(pdparams))
        jit = build_backbone(f"paddle-jit:{prefix}")
        tnet = MobileNetV2(num_classes=12).eval()
        tnet.load_state_dict(state)
        from paddle.base import core

        core.set_num_threads(a.threads)
        torch.set_num_threads(a.threads)
        x = torch.cat([t for _, t in images_to_batches(resize_to(imgs, (227, 227)))])
        mean, std = eager.mean, eager.std

        def run_paddle_eager(batches):
            t0 = time.perf_counter()
            with paddle.no_grad():
                for b in batches:
                    eager.pooled(b)
            return sum(len(b) for b in batches) / (time.perf_counter() - t0)

        def run_paddle_jit(batches):
            t0 = time.perf_counter()
            for b in batches:
                jit.classify(b)
            return sum(len(b) for b in batches) / (time.perf_counter() - t0)

        def run_torch(batches):
            t0 = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    torch.flatten(torch.nn.functional.adaptive_avg_pool2d(tnet.forward_features((b - mean) / std), 1), 1)
            return sum(len(b) for b in batches) / (time.perf_counter() - t0)

        engines = {"paddle_eager": run_paddle_eager, "paddle_jit": run_paddle_jit, "torch_converted": run_torch}
        forward = {}
        for bs in (1, 32):
            batches = list(torch.split(x, bs))
            for fn in engines.values():  # warm-up
                fn(batches[:1])
            rates = {k: [] for k in engines}
            for _ in range(a.repeats):
                for k, fn in engines.items():
                    rates[k].append(fn(batches))
            row = {f"{k}_images_per_s": round(statistics.median(v), 2) for k, v in rates.items()}
            row["ratio_torch_over_paddle_eager"] = round(row["torch_converted_images_per_s"] / row["paddle_eager_images_per_s"], 3)
            row["ratio_torch_over_paddle_jit"] = round(row["torch_converted_images_per_s"] / row["paddle_jit_images_per_s"], 3)
            forward[f"batch{bs}"] = row

        # cbir's pooled extractor end to end on decoded images (resize + network + pooling), batch 32
        seed_conf = {"pool": "gap", "stages": ["last"], "input_size": [227, 227], "max_side": None}
        exts = {
            "paddle:mobilenet_v2": make_extractor("pooled", {"backbone": "paddle:mobilenet_v2", "weights": str(pdparams)}),
            "mobilenet_v2 (converted)": make_extractor("pooled", {"backbone": "mobilenet_v2", "weights": str(pth), **seed_conf}),
        }
        ext_rates = {k: [] for k in exts}
        for e in exts.values():
            e.describe(imgs[:2])
        for _ in range(a.repeats):
            for k, e in exts.items():
                t0 = time.perf_counter()
                for i in range(0, len(imgs), 32):
                    e.describe(imgs[i : i + 32])
                ext_rates[k].append(len(imgs) / (time.perf_counter() - t0))
        extractor = {f"{k}_images_per_s": round(statistics.median(v), 2) for k, v in ext_rates.items()}
        extractor["ratio_torch_over_paddle"] = round(
            extractor["mobilenet_v2 (converted)_images_per_s"] / extractor["paddle:mobilenet_v2_images_per_s"], 3)
        feats = {k: e.describe(imgs[:32]) for k, e in exts.items()}
        a_, b_ = feats.values()
        parity = {k: float(f"{v:.3g}") for k, v in torch_parity(pdparams, state, imgs[:32]).items()}
        parity["pooled_extractor_max_abs"] = float(f"{float(np.abs(a_ - b_).max()):.3g}")

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": a.threads,
                    "load_avg_1min_start": round(load0, 2), "load_avg_1min_end": round(os.getloadavg()[0], 2),
                    "note": "2-core machine shared with other work; engines alternate within each repeat, median kept"},
        "versions": {"paddle": paddle.__version__, "torch": torch.__version__},
        "images": {"dataset": ds, "n": len(imgs), "input": "227x227, seed 003 preprocessing"},
        "forward": forward,
        "extractor_batch32": extractor,
        "parity": parity,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
