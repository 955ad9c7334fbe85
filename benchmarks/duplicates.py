"""Copy detection: does `cbir duplicates` find edited copies of a photo, and leave other photos of its class alone?

    python benchmarks/duplicates.py                          # 500 corel1k sources x 3 edits + the 1000 photos as distractors
    python benchmarks/duplicates.py --sources 100 --edits 2  # a quick look
    python benchmarks/duplicates.py --only-100k              # the 100k timing (synthetic descriptors) alone

The set: ``--sources`` photos of ../shared/data/category_wang_corel1k (the first of each class in file-name order,
evenly over the 10 classes), each with ``--edits`` copies, each copy of a different edit type drawn at random
(seeded) from EDITS: JPEG quality 10-90, resize 0.25-2x, crop 5-50 % of the area, rotation +-10 degrees, rotation by
90/180/270, mirror, brightness, contrast, saturation, grayscale, blur, padding/letterbox, text overlay, logo overlay,
and combinations of 2-3 of them. Every corel1k photo is in the set (the other images of each class are the
distractors: they must not be called duplicates). Written to a temporary folder (the images are research-use only:
never into the repository).

Truth: the pairs inside each family (a source and its copies). Pairs of two unedited corel photos are left out of
every method's score: their truth is unknown (corel1k holds bursts of the same scene and mirrored composites); a copy
paired with any photo outside its family is a false pair. Each method's predicted pairs: for cbir, every pair inside
a group it reports (what a user acts on); for imagededup, the pairs its ``find_duplicates`` returns with its default
``max_distance_threshold`` (10 bits of 64). Per edit type: the truth and predicted pairs that hold a copy of that type.
cbir, on an index of each extractor (``--extractors``), two ways: descriptors alone (``--no-verify``; run through
``cbir.duplicates.find_duplicates`` as ``cbir duplicates --index`` does) at the threshold of best F1 on the families
of the even-numbered sources, and verified (the default: candidates from the same kNN search, RootSIFT + RANSAC;
every candidate >= 0.5 verified once, then the candidate threshold of best F1 on the even sources). The odd sources
are reported apart as held out. imagededup (PHash, DHash, WHash, AHash) is imported only here, if installed
(``pip install --no-deps imagededup PyWavelets``): it is not a cbir dependency; its CNN method needs torchvision and
downloaded weights, so it cannot run offline here.

Also: the seconds of a 100,000-image duplicate search on synthetic descriptors (``--n-synthetic``) through the same
kNN search an index of that size uses (``--ann auto``: IVF over uncentred PCA-512 + SQ8).
Writes benchmarks/results/duplicates.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

COREL = REPO.parent / "shared" / "data" / "category_wang_corel1k"
EDITS = ["jpeg", "resize", "crop", "rotate", "rot90", "mirror", "brightness", "contrast", "saturation", "grayscale",
         "blur", "pad", "text", "logo", "combo"]


# ----------------------------------------------------------------------------- edits


def edit(img: np.ndarray, kind: str, rng: np.random.Generator) -> Tuple[np.ndarray, Dict, Optional[int]]:
    """``img`` (BGR uint8) edited by ``kind``; returns (image, parameters, JPEG quality to save with or None)."""
    import cv2

    h, w = img.shape[:2]
    if kind == "jpeg":
        q = int(rng.integers(10, 91))
        return img, {"quality": q}, q
    if kind == "resize":
        s = float(np.exp(rng.uniform(np.log(0.25), np.log(2.0))))
        out = cv2.resize(img, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
        return out, {"scale": round(s, 3)}, None
    if kind == "crop":
        removed = float(rng.uniform(0.05, 0.5))
        keep = np.sqrt(1 - removed)
        ch, cw = max(8, int(h * keep)), max(8, int(w * keep))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        return img[y:y + ch, x:x + cw].copy(), {"area_removed": round(removed, 3)}, None
    if kind == "rotate":
        a = float(rng.uniform(2, 10)) * (1 if rng.random() < 0.5 else -1)
        m = cv2.getRotationMatrix2D((w / 2, h / 2), a, 1.0)
        return cv2.warpAffine(img, m, (w, h), borderMode=cv2.BORDER_CONSTANT), {"degrees": round(a, 2)}, None
    if kind == "rot90":
        k = int(rng.integers(1, 4))
        return np.ascontiguousarray(np.rot90(img, k)), {"degrees": 90 * k}, None
    if kind == "mirror":
        return img[:, ::-1].copy(), {}, None
    if kind == "brightness":
        b = float(rng.uniform(25, 60)) * (1 if rng.random() < 0.5 else -1)
        return cv2.convertScaleAbs(img, alpha=1.0, beta=b), {"beta": round(b, 1)}, None
    if kind == "contrast":
        c = float(rng.choice([rng.uniform(0.5, 0.8), rng.uniform(1.25, 1.6)]))
        mean = img.mean()
        return np.clip((img.astype(np.float32) - mean) * c + mean, 0, 255).astype(np.uint8), {"factor": round(c, 2)}, None
    if kind == "saturation":
        s = float(rng.choice([rng.uniform(0.2, 0.6), rng.uniform(1.4, 2.0)]))
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV).astype(np.float32)
        hsv[..., 1] = np.clip(hsv[..., 1] * s, 0, 255)
        return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR), {"factor": round(s, 2)}, None
    if kind == "grayscale":
        g = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        return cv2.cvtColor(g, cv2.COLOR_GRAY2BGR), {}, None
    if kind == "blur":
        s = float(rng.uniform(1.0, 3.0))
        return cv2.GaussianBlur(img, (0, 0), s), {"sigma": round(s, 2)}, None
    if kind == "pad":
        if rng.random() < 0.5:  # letterbox to a square
            side = max(h, w)
            out = np.zeros((side, side, 3), np.uint8)
            y, x = (side - h) // 2, (side - w) // 2
            out[y:y + h, x:x + w] = img
            return out, {"mode": "letterbox"}, None
        f = float(rng.uniform(0.05, 0.25))
        py, px = int(h * f), int(w * f)
        colour = [int(v) for v in rng.integers(0, 256, 3)]
        return cv2.copyMakeBorder(img, py, py, px, px, cv2.BORDER_CONSTANT, value=colour), {"mode": "border", "fraction": round(f, 3)}, None
    if kind == "text":
        out = img.copy()
        scale = max(0.5, w / 400)
        words = ["SAMPLE", "holiday 2019", "(c) photo", "DRAFT", "best day ever"]
        txt = str(rng.choice(words))
        y = int(rng.uniform(0.2, 0.9) * h)
        cv2.putText(out, txt, (int(0.05 * w), y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), max(1, int(2 * scale)), cv2.LINE_AA)
        return out, {"text": txt}, None
    if kind == "logo":
        out = img.copy()
        s = int(min(h, w) * rng.uniform(0.12, 0.25))
        y0 = int(rng.choice([0.03 * h, h - s - 0.03 * h]))
        x0 = int(rng.choice([0.03 * w, w - s - 0.03 * w]))
        over = out.copy()
        cv2.rectangle(over, (x0, y0), (x0 + s, y0 + s), (30, 30, 200), -1)
        cv2.circle(over, (x0 + s // 2, y0 + s // 2), s // 3, (255, 255, 255), -1)
        a = float(rng.uniform(0.5, 0.9))
        return cv2.addWeighted(over, a, out, 1 - a, 0), {"opacity": round(a, 2), "size": s}, None
    if kind == "combo":
        parts = list(rng.choice(["jpeg", "resize", "crop", "brightness", "saturation", "text", "blur", "pad", "mirror"],
                                size=int(rng.integers(2, 4)), replace=False))
        q = None
        params = {}
        for p in parts:
            img, pp, qq = edit(img, p, rng)
            params[p] = pp
            q = qq if qq is not None else q
        return img, {"parts": params}, q
    raise ValueError(kind)


def make_set(out: Path, n_sources: int, n_edits: int, seed: int = 0) -> Dict:
    """Write the set to ``out``: every corel1k photo and ``n_edits`` copies of ``n_sources`` of them; returns its truth."""
    import csv

    import cv2

    truth_file = out / "truth.json"
    if truth_file.is_file():
        t = json.loads(truth_file.read_text())
        if t.get("n_sources") == n_sources and t.get("n_edits") == n_edits and t.get("seed") == seed:
            return t
    rows = list(csv.DictReader(open(COREL / "labels.csv")))
    from cbir.data import natural_key

    by_class: Dict[str, List[str]] = {}
    for r in sorted(rows, key=lambda r: natural_key(r["path"])):
        by_class.setdefault(r["label"], []).append(r["path"])
    per = -(-n_sources // len(by_class))
    sources = [p for c in sorted(by_class) for p in by_class[c][:per]][:n_sources]
    rng = np.random.default_rng(seed)
    (out / "img").mkdir(parents=True, exist_ok=True)
    label = {r["path"]: r["label"] for r in rows}
    images: Dict[str, Dict] = {}
    for r in rows:
        name = "img/" + os.path.basename(r["path"])
        img = cv2.imread(str(COREL / r["path"]))
        cv2.imwrite(str(out / name), img, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images[name] = {"family": name if r["path"] in sources else None, "edit": None, "label": r["label"]}
    for si, p in enumerate(sources):
        src = "img/" + os.path.basename(p)
        img = cv2.imread(str(COREL / p))
        for kind in rng.choice(EDITS, size=n_edits, replace=False):
            e, params, q = edit(img, str(kind), rng)
            stem = os.path.splitext(os.path.basename(p))[0]
            name = f"img/{stem}_{kind}.jpg" if q is not None else f"img/{stem}_{kind}.png"
            if q is not None:
                cv2.imwrite(str(out / name), e, [cv2.IMWRITE_JPEG_QUALITY, q])
            else:
                cv2.imwrite(str(out / name), e)
            images[name] = {"family": src, "edit": str(kind), "params": params, "label": label[p], "source_index": si}
        images[src]["source_index"] = si
    t = {"n_sources": n_sources, "n_edits": n_edits, "seed": seed, "images": images}
    truth_file.write_text(json.dumps(t))
    return t


# ----------------------------------------------------------------------------- scoring


def truth_pairs(truth: Dict) -> Set[Tuple[str, str]]:
    fams: Dict[str, List[str]] = {}
    for n, d in truth["images"].items():
        if d["family"]:
            fams.setdefault(d["family"], []).append(n)
    return {tuple(sorted((a, b))) for ms in fams.values() for i, a in enumerate(ms) for b in ms[i + 1:]}


def score(pred: Set[Tuple[str, str]], truth: Dict, subset: Optional[Set[int]] = None) -> Dict:
    """Pair precision / recall / F1 overall and per edit type (``subset``: only families of these source indices, and
    predicted pairs touching them)."""
    imgs = truth["images"]
    gt = truth_pairs(truth)

    def fam_ok(n):
        d = imgs[n]
        return subset is None or (d["family"] is not None and imgs[d["family"]].get("source_index") in subset)

    # pairs of two unedited corel photos are left out for every method: their truth is unknown (corel1k holds
    # bursts of the same scene and mirrored composites, which RANSAC rightly verifies); a copy with any other photo counts
    pred = {p for p in pred if imgs[p[0]]["edit"] is not None or imgs[p[1]]["edit"] is not None or p in gt}
    if subset is not None:
        gt = {p for p in gt if fam_ok(p[0])}
        pred = {p for p in pred if fam_ok(p[0]) or fam_ok(p[1])}

    def prf(g, p):
        tp = len(g & p)
        prec = tp / len(p) if p else 1.0
        rec = tp / len(g) if g else 1.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        return {"precision": round(prec, 4), "recall": round(rec, 4), "f1": round(f1, 4), "truth_pairs": len(g), "predicted_pairs": len(p)}

    out = {"overall": prf(gt, pred), "per_edit": {}}
    for kind in EDITS:
        has = lambda pair: imgs[pair[0]]["edit"] == kind or imgs[pair[1]]["edit"] == kind  # noqa: E731
        out["per_edit"][kind] = prf({p for p in gt if has(p)}, {p for p in pred if has(p)})
    return out


def group_pairs(groups: List[List[str]]) -> Set[Tuple[str, str]]:
    return {tuple(sorted((a, b))) for g in groups for i, a in enumerate(g) for b in g[i + 1:]}


# ----------------------------------------------------------------------------- methods


def run_cbir(set_dir: Path, work: Path, extractor: str, truth: Dict, conf=None) -> List[Dict]:
    """Two rows for an index of ``extractor``: descriptors alone (``--no-verify``) and verified (the default)."""
    from cbir.build import build_index
    from cbir.duplicates import MIN_INLIERS, PairVerifier, components, find_duplicates, near_pairs
    from cbir.folders import read_images
    from cbir.query import Index

    out = work / f"idx-{extractor}"
    entries = [e for e in read_images(set_dir) if e.name.startswith("img/")]
    t = time.time()
    build_index(entries, out, extractor=extractor, conf=conf, progress=True)
    t_describe = time.time() - t
    idx = Index(out)
    names = [str(n) for n in idx.names]
    paths = [str(p) for p in idx.paths]
    n = len(names)
    imgs = truth["images"]
    even = {d["source_index"] for d in imgs.values() if d.get("source_index") is not None and d["source_index"] % 2 == 0}
    odd = {d["source_index"] for d in imgs.values() if d.get("source_index") is not None and d["source_index"] % 2 == 1}
    lo = 0.5
    t = time.time()
    i, j, s = near_pairs(lambda v, k, ex: idx.search(v, k, exclude=ex), idx.query_vectors, n, lo, k=5, progress=False)
    t_search = time.time() - t

    def pairs_of(keep):
        return group_pairs([[names[r] for r in c] for c in components(n, i[keep], j[keep])])

    # descriptors alone: the threshold of best F1 on the even sources' families
    sweep = [{"threshold": round(float(thr), 3), "fit": score(pairs_of(s >= thr), truth, even)["overall"]}
             for thr in np.round(np.arange(0.60, 0.991, 0.01), 3)]
    best = max(sweep, key=lambda r: (r["fit"]["f1"], r["threshold"]))
    thr = best["threshold"]
    t = time.time()
    rep = find_duplicates(index=idx, threshold=thr, verify=False, progress=False)
    t_find = time.time() - t
    pred = group_pairs([g["images"] for g in rep["groups"]])
    rows = [{"method": f"cbir {extractor} (descriptors alone, --no-verify)", "extractor": extractor, "verify": False, "threshold": thr,
             "seconds": {"describe": round(t_describe, 2), "find": round(t_find, 2), "total": round(t_describe + t_find, 2)},
             "all": score(pred, truth), "held_out_odd_sources": score(pred, truth, odd)["overall"],
             "sweep": [{"threshold": r["threshold"], **{f"{k}_fit": r["fit"][k] for k in ("precision", "recall", "f1")}} for r in sweep]}]
    # verified: every candidate >= lo verified once, then the candidate threshold of best F1 on the even sources
    t = time.time()
    v = PairVerifier(min_inliers=0)  # the verdict's rule only; the inlier floor is swept below
    res = [v(paths[a], paths[b]) for a, b in zip(i.tolist(), j.tolist())]
    ok = np.array([r["verified"] for r in res], bool)
    inl = np.array([r["inliers"] for r in res], np.int64)
    t_verify = time.time() - t
    vsweep = [{"threshold": round(float(c), 3), "min_inliers": mi, "fit": score(pairs_of(ok & (s >= c) & (inl >= mi)), truth, even)["overall"],
               "candidates": int((s >= c).sum())} for c in np.round(np.arange(lo, 0.851, 0.05), 3) for mi in (15, 25, 35, 50, 70, 100)]
    vbest = max(vsweep, key=lambda r: (round(r["fit"]["f1"], 3), r["threshold"]))
    c, mi = vbest["threshold"], vbest["min_inliers"]
    pred = pairs_of(ok & (s >= c) & (inl >= mi))
    rows.append({"method": f"cbir {extractor} (verified, the default)", "extractor": extractor, "verify": True, "threshold": c,
                 "min_inliers": mi, "at_default_min_inliers": {
                     "min_inliers": MIN_INLIERS, "all": score(pairs_of(ok & (s >= c) & (inl >= MIN_INLIERS)), truth)["overall"]},
                 "seconds": {"describe": round(t_describe, 2), "find": round(t_search + t_verify, 2),
                             "total": round(t_describe + t_search + t_verify, 2)},
                 "seconds_note": f"find = kNN search + verification of all {len(i)} candidates >= {lo} (the sweep's; "
                                 f"{vbest['candidates']} are >= the chosen threshold): an upper bound of `cbir duplicates --index`",
                 "all": score(pred, truth), "held_out_odd_sources": score(pred, truth, odd)["overall"],
                 "sweep": [{"threshold": r["threshold"], "min_inliers": r["min_inliers"], "candidates": r["candidates"],
                            **{f"{k}_fit": r["fit"][k] for k in ("precision", "recall", "f1")}} for r in vsweep]})
    return rows


def _import_imagededup():
    """imagededup's hashing without its CNN module (which imports torchvision at import time)."""
    for name in ("imagededup.utils.models", "imagededup.methods.cnn"):
        if name not in sys.modules:
            stub = types.ModuleType(name)
            stub.CustomModel = stub.MobilenetV3 = stub.CNN = None
            stub.DEFAULT_MODEL_NAME = "default_model"
            sys.modules[name] = stub
    from imagededup.methods import AHash, DHash, PHash, WHash

    return {"PHash": PHash, "DHash": DHash, "WHash": WHash, "AHash": AHash}


def run_imagededup(set_dir: Path, truth: Dict) -> List[Dict]:
    try:
        methods = _import_imagededup()
    except ImportError as e:
        return [{"method": "imagededup", "error": f"not installed ({e}); pip install --no-deps imagededup PyWavelets"}]
    rows = []
    for name, cls in methods.items():
        h = cls(verbose=False)
        t = time.time()
        enc = h.encode_images(image_dir=str(set_dir / "img"), recursive=False, num_enc_workers=2)
        t_enc = time.time() - t
        t = time.time()
        dups = h.find_duplicates(encoding_map=enc, num_dist_workers=2)  # default max_distance_threshold=10
        t_find = time.time() - t
        pred = {tuple(sorted(("img/" + a, "img/" + b))) for a, bs in dups.items() for b in bs}
        rows.append({"method": f"imagededup {name}", "max_distance_threshold": 10,
                     "seconds": {"describe": round(t_enc, 2), "find": round(t_find, 2), "total": round(t_enc + t_find, 2)},
                     "all": score(pred, truth)})
    rows.append({"method": "imagededup CNN", "error": "not run: needs torchvision and MobileNetV3 weights downloaded at run time (offline here)"})
    return rows


def time_100k(n: int, dim: int = 1536, seed: int = 0) -> Dict:
    """Seconds of the duplicate search over ``n`` synthetic unit descriptors (1 % planted near copies) through the
    search structure an index of ``n`` images gets by default, and how many planted pairs it finds."""
    from cbir.duplicates import components, near_pairs
    from cbir.index.backend import FaissBackend, auto_spec

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x[:, :64] *= 6.0  # some structure: a few strong directions, like CNN descriptors
    n_copies = n // 100
    src = rng.choice(n, n_copies, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), n_copies, replace=False)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    noise = rng.standard_normal((n_copies, dim), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[dst] = x[src] + 0.3 * noise
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    spec = auto_spec("cosine", dim, n)
    t = time.time()
    b = FaissBackend(spec)
    b.train(x[rng.choice(n, min(n, 200_000), replace=False)])
    b.add(np.arange(n, dtype=np.int64), x)
    t_build = time.time() - t
    t = time.time()
    i, j, s = near_pairs(lambda v, k, ex: b.search(v, k, exclude=ex), lambda rows: x[rows], n, 0.9, k=10, progress=False)
    t_search = time.time() - t
    comps = components(n, i, j)
    found = {(min(a, c), max(a, c)) for a, c in zip(i.tolist(), j.tolist())}
    planted = {(min(a, c), max(a, c)) for a, c in zip(src.tolist(), dst.tolist())}
    return {"n": n, "dim": dim, "search": spec.to_json(), "threads": int(os.environ.get("OMP_NUM_THREADS") or 0) or None,
            "seconds_index": round(t_build, 2), "seconds_duplicates": round(t_search, 2),
            "planted_pairs": len(planted), "planted_found": len(planted & found), "pairs_found": len(found), "groups": len(comps),
            "copy_cosine_median": round(float(np.median(np.sum(x[src] * x[dst], axis=1))), 4)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", type=int, default=500)
    ap.add_argument("--edits", type=int, default=3, help="copies per source, each of a different edit type")
    ap.add_argument("--extractors", nargs="+", default=["fused", "pooled"])
    ap.add_argument("--work", help="folder for the generated set and indexes (default: a temporary one, removed)")
    ap.add_argument("--n-synthetic", type=int, default=100_000)
    ap.add_argument("--only-100k", action="store_true")
    ap.add_argument("--no-100k", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "duplicates.json"))
    a = ap.parse_args()
    from cbir.runtime import set_threads

    set_threads(a.threads)
    out_path = Path(a.out)
    res = json.loads(out_path.read_text()) if out_path.is_file() else {}
    if not a.only_100k:
        if not COREL.is_dir():
            print(f"needs ../shared/data/category_wang_corel1k ({COREL} not found)")
            return 2
        tmp = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="cbir-dupbench-"))
        set_dir = tmp / "set"
        t = time.time()
        truth = make_set(set_dir, a.sources, a.edits)
        n_img = len(truth["images"])
        print(f"set: {n_img} images ({a.sources} sources x {a.edits} edits + {n_img - a.sources * a.edits} photos), {time.time() - t:.0f} s")
        methods = []
        for ex in a.extractors:
            for r in run_cbir(set_dir, tmp, ex, truth):
                methods.append(r)
                print(f"{r['method']}: threshold {r['threshold']}, F1 {r['all']['overall']['f1']} (held out "
                      f"{r['held_out_odd_sources']['f1']}), {r['seconds']['total']} s", flush=True)
        for r in run_imagededup(set_dir, truth):
            methods.append(r)
            if "all" in r:
                print(f"{r['method']}: F1 {r['all']['overall']['f1']}, {r['seconds']['total']} s", flush=True)
        res.update({"set": {"source": "../shared/data/category_wang_corel1k", "images": n_img, "sources": a.sources,
                            "edits_per_source": a.edits, "edit_types": EDITS, "distractors": n_img - a.sources * (a.edits + 1),
                            "truth_pairs": len(truth_pairs(truth))},
                    "methods": methods, "threads": a.threads})
        table = {}
        for kind in EDITS + ["overall"]:
            row = {}
            for m in methods:
                if "all" in m:
                    row[m["method"]] = (m["all"]["overall"] if kind == "overall" else m["all"]["per_edit"][kind])["f1"]
            table[kind] = row
        res["f1_table"] = table
        if not a.work:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if not a.no_100k:
        r = time_100k(a.n_synthetic)
        res["synthetic_100k"] = r
        print(f"{r['n']} synthetic descriptors: duplicates in {r['seconds_duplicates']} s (index {r['seconds_index']} s), "
              f"{r['planted_found']}/{r['planted_pairs']} planted pairs found")
    res["loadavg_at_end"] = os.getloadavg()[0]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(res, indent=2))
    print(f"written {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
