"""Exact and near-duplicate images of a folder or an index: groups, the one to keep, never a file touched.

* exact duplicates: the same SHA-256 of the file (the index's content.h5 is reused where the file is unchanged);
* near duplicates (re-encoded, resized, cropped, recoloured, lightly edited copies): pairs whose descriptors are
  at least ``threshold`` similar, found by the index's own k-nearest-neighbour search in query chunks (each
  image's ``k`` nearest: no N x N matrix, no O(N^2) Python loop), optionally confirmed by local features +
  RANSAC (``verify``: RootSIFT, mutual nearest neighbours, a homography judged by the verdict of cbir/local);
* groups: connected components of the exact and near pairs; one image per group is the one to ``keep``
  (largest, oldest or first).

The default thresholds are measured by benchmarks/duplicates.py (results/duplicates.json) for each extractor on its
own descriptors; an extractor without a measured one needs ``threshold``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .data import natural_key
from .errors import CbirError, DecodeError
from .progress import bar as _progress, log as _log

PathLike = Union[str, os.PathLike]

#: Similarity from which two images are near duplicates by their descriptors alone (``verify=False``), per extractor
#: (its own descriptors; for a Hamming index the score is 1 - distance / bits), and the lower one from which a pair is a
#: candidate that local features + RANSAC then confirm (``verify=True``, the default). Both chosen by
#: benchmarks/duplicates.py on its own descriptors of each extractor: the threshold of best pair F1 on the copies of the
#: even-numbered sources (500 corel1k photos, 15 kinds of edits, the 1000 photos of their classes as distractors);
#: benchmarks/results/duplicates.json has the sweeps and the held-out half.
#: Measured (2000 images, 1500 true pairs): fused 0.92 alone F1 0.693, 0.60 verified 0.908; pooled 0.92 alone 0.719,
#: 0.70 verified 0.907 at MIN_INLIERS (imagededup's best, DHash, 0.739).
THRESHOLDS: Dict[str, float] = {"fused": 0.92, "pooled": 0.92}
CANDIDATE_THRESHOLDS: Dict[str, float] = {"fused": 0.60, "pooled": 0.70}
#: Inliers a verified pair needs (beyond the verdict's own rule): a copy keeps most of its keypoints (median 320 of 512
#: measured), another shot of the same scene fewer (median 50-55); benchmarks/duplicates.py swept it with the threshold
#: (fused's best fit: 50; pooled's: 100 on the fit half, 0.899 overall, against 0.907 at 50: 50 for both).
MIN_INLIERS = 50
KEEP_RULES = ("largest", "oldest", "first")
#: Neighbours searched per image: a group larger than k + 1 still forms, through its members' own neighbours.
DEFAULT_K = 5


def threshold_for(extractor: str, verify: bool = True) -> float:
    table = CANDIDATE_THRESHOLDS if verify else THRESHOLDS
    if extractor not in table:
        raise CbirError(f"no measured duplicate threshold for extractor {extractor!r} (measured: "
                        f"{', '.join(f'{k} {v}' for k, v in sorted(table.items()))}{' with verification' if verify else ''}); "
                        "pass --threshold")
    return table[extractor]


def near_pairs(search: Callable[[np.ndarray, int, np.ndarray], Tuple[np.ndarray, np.ndarray]],
               vectors: Callable[[np.ndarray], np.ndarray], n: int, threshold: float, k: int = DEFAULT_K,
               chunk: int = 4096, progress: bool = True) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, score)`` with ``i < j`` and score >= ``threshold`` among each row's ``k`` nearest neighbours.

    ``search(vecs, k, exclude)`` is the index's search (rows, best first; ``exclude[i]`` left out of query i) and
    ``vectors(rows)`` the stored vectors of rows. Memory: one chunk of queries and their k results at a time.
    """
    k = max(1, min(int(k), n - 1))
    out_i, out_j, out_s = [], [], []
    pb = _progress(total=n, desc="duplicates: neighbours", enabled=progress and n > 0)
    for s0 in range(0, n, chunk):
        rows = np.arange(s0, min(n, s0 + chunk), dtype=np.int64)
        scores, nbr = search(vectors(rows), k, rows)
        scores, nbr = np.asarray(scores, np.float32), np.asarray(nbr, np.int64)
        ok = (nbr >= 0) & (scores >= threshold) & (nbr != rows[:, None])
        qi = np.broadcast_to(rows[:, None], nbr.shape)[ok]
        out_i.append(np.minimum(qi, nbr[ok]))
        out_j.append(np.maximum(qi, nbr[ok]))
        out_s.append(scores[ok])
        pb.update(len(rows))
    pb.close()
    if not out_i:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(out_i), np.concatenate(out_j), np.concatenate(out_s)
    key = i * n + j
    order = np.lexsort((-s, key))  # per pair its best score (both directions may find it)
    key, i, j, s = key[order], i[order], j[order], s[order]
    first = np.ones(len(key), bool)
    first[1:] = key[1:] != key[:-1]
    return i[first], j[first], s[first]


def components(n: int, i: np.ndarray, j: np.ndarray) -> List[np.ndarray]:
    """Connected components (of size >= 2) of the graph on ``n`` rows with edges ``(i, j)``."""
    if not len(i):
        return []
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    g = coo_matrix((np.ones(len(i), np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    _, lab = connected_components(g, directed=False)
    order = np.argsort(lab, kind="stable")
    bounds = np.flatnonzero(np.diff(lab[order])) + 1
    return [c for c in np.split(order, bounds) if len(c) > 1]


def content_hashes(folder: Optional[PathLike], names: Sequence[str], paths: Sequence[str], progress: bool = True) -> List[Optional[str]]:
    """SHA-256 of each gallery file: from the index's content.h5 when the file's size and mtime are those recorded,
    else read now (None for a file that cannot be read)."""
    from .data import file_stat
    from .index.verify import file_sha256

    recorded = {}
    if folder is not None:
        from .sync import read_content

        recorded = read_content(folder)
    out: List[Optional[str]] = []
    pb = _progress(total=len(paths), desc="duplicates: content hashes", enabled=progress and len(paths) > 0)
    for n, p in zip(names, paths):
        c = recorded.get(str(n))
        if c is not None and file_stat(p) == (c[1], c[2]):
            out.append(c[0])
        else:
            try:
                out.append(file_sha256(p))
            except OSError:
                out.append(None)
        pb.update()
    pb.close()
    return out


def _file_facts(path: str) -> Dict[str, Any]:
    """Width, height (from the header: nothing decoded), bytes and mtime of a file."""
    from PIL import Image

    facts: Dict[str, Any] = {"width": None, "height": None, "bytes": None, "mtime": None}
    try:
        st = os.stat(path)
        facts["bytes"], facts["mtime"] = int(st.st_size), float(st.st_mtime)
        with Image.open(path) as im:
            facts["width"], facts["height"] = int(im.size[0]), int(im.size[1])
    except Exception:  # noqa: BLE001 - a file that went away or lost its header: no facts, still listed
        pass
    return facts


def choose_keep(names: Sequence[str], facts: Sequence[Dict[str, Any]], rule: str) -> int:
    """Position of the image to keep: ``largest`` (most pixels, then bytes), ``oldest`` (mtime) or ``first`` (name)."""
    if rule not in KEEP_RULES:
        raise CbirError(f"--keep {rule!r}: expected one of {', '.join(KEEP_RULES)}")
    order = sorted(range(len(names)), key=lambda t: natural_key(names[t]))
    if rule == "first":
        return order[0]
    if rule == "oldest":
        return min(order, key=lambda t: facts[t]["mtime"] if facts[t]["mtime"] is not None else float("inf"))
    return max(order[::-1], key=lambda t: ((facts[t]["width"] or 0) * (facts[t]["height"] or 0), facts[t]["bytes"] or 0))


def _mutual_nn(d0: np.ndarray, d1: np.ndarray) -> Dict[str, np.ndarray]:
    """Mutual nearest neighbours of two sets of unit descriptors (RootSIFT) by their dot product, in cbir/local's match
    layout; one matrix product, the whole of it (the images' keypoints are capped)."""
    sim = d0 @ d1.T
    nn01 = sim.argmax(axis=1)
    nn10 = sim.argmax(axis=0)
    i = np.flatnonzero(nn10[nn01] == np.arange(len(d0)))
    return {"matches": np.stack([i, nn01[i]], axis=1), "scores": sim[i, nn01[i]]}


class PairVerifier:
    """Local features + RANSAC on a candidate pair: RootSIFT (``max_keypoints`` strongest), mutual nearest neighbours (:func:`_mutual_nn`), a
    homography and cbir/local's verdict (enough inliers, a sound inlier ratio, a well-conditioned model) with at least
    ``min_inliers`` inliers; a pair that
    fails is tried once more with the second image mirrored. Each image's features are extracted once and kept (float16
    descriptors, at most ``cache`` images), so a gallery's pairs cost one extraction per image plus the matching."""

    def __init__(self, max_side: int = 640, max_keypoints: int = 512, cache: int = 8192, min_inliers: int = MIN_INLIERS) -> None:
        from .local import build_extractor

        self.max_side = max_side
        self.extractor = build_extractor("rootsift", max_keypoints=max_keypoints)
        self.cache = cache
        self.min_inliers = int(min_inliers)
        #: a copy's matches are mostly inliers: one MAGSAC++ run of at most 2000 iterations finds its model (the
        #: re-ranking default, 4 restarts x 10,000, is for hard viewpoint changes and costs 20x on unrelated pairs)
        self.ransac = {"method": "magsac", "restarts": 1, "max_iters": 2000}
        self._feats: Dict[Tuple[str, bool], Optional[Tuple[Dict[str, np.ndarray], Tuple[int, int]]]] = {}

    def features(self, path: str, mirrored: bool = False):
        from .data import decode_image

        key = (path, mirrored)
        if key not in self._feats:
            if len(self._feats) >= self.cache:
                self._feats.pop(next(iter(self._feats)))
            try:
                img = decode_image(path, max_side=self.max_side)
                if mirrored:
                    img = np.ascontiguousarray(img[:, ::-1])
                f = self.extractor.extract(img)
                f = {k: (np.asarray(v, np.float16) if k == "descriptors" else np.asarray(v)) for k, v in f.items()}
                self._feats[key] = (f, (int(img.shape[1]), int(img.shape[0])))
            except DecodeError:
                self._feats[key] = None
        return self._feats[key]

    def __call__(self, path0: str, path1: str) -> Dict[str, Any]:
        from .local.base import correspondences
        from .local.verify import verify as fit

        a = self.features(path0)
        if a is None or self.features(path1) is None:
            return {"verified": False, "inliers": 0, "mirrored": False, "reason": "unreadable"}
        f0, size0 = a
        f0 = {**f0, "descriptors": np.asarray(f0["descriptors"], np.float32)}
        best = None
        for mirrored in (False, True):
            f1 = self.features(path1, mirrored)[0]
            f1 = {**f1, "descriptors": np.asarray(f1["descriptors"], np.float32)}
            if len(f0["keypoints"]) < 4 or len(f1["keypoints"]) < 4:
                got = {"verified": False, "inliers": 0, "mirrored": mirrored, "reason": "too few keypoints"}
            else:
                c = correspondences(f0, f1, _mutual_nn(f0["descriptors"], f1["descriptors"]))
                v = fit(c["keypoints0"], c["keypoints1"], "homography", **self.ransac)
                why = v.verdict(c["keypoints0"], image_size0=size0)
                ok = bool(why["verified"]) and int(v.score) >= self.min_inliers
                got = {"verified": ok, "inliers": int(v.score), "mirrored": mirrored,
                       "reason": why["reason"] or (None if ok else f"{int(v.score)} inliers < {self.min_inliers}")}
            if best is None or (got["verified"], got["inliers"]) > (best["verified"], best["inliers"]):
                best = got
            if got["verified"]:
                break
        return best


@dataclass
class _Gallery:
    names: List[str]
    paths: List[str]
    extractor: str
    metric: str
    folder: Optional[Path]


def find_duplicates(index=None, folder: Optional[PathLike] = None, threshold: Optional[float] = None, k: int = DEFAULT_K,
                    verify: bool = True, keep: str = "largest", progress: bool = True, extractor: Optional[str] = None,
                    conf: Optional[Dict[str, Any]] = None, index_out: Optional[PathLike] = None, batch_size: int = 16, workers: int = 2,
                    near: bool = True, min_inliers: int = MIN_INLIERS) -> Dict[str, Any]:
    """Groups of duplicates among the images of ``index`` (a folder path or an opened :class:`cbir.query.Index`) or of
    ``folder`` (described first into a temporary index, or into ``index_out`` to keep it). Returns a JSON-able report:
    ``{"groups": [{"images", "keep", "kind", "pairs", ...}], "threshold", "n_images", "n_groups", "n_redundant", ...}``.
    Nothing is deleted or moved."""
    if keep not in KEEP_RULES:
        raise CbirError(f"--keep {keep!r}: expected one of {', '.join(KEEP_RULES)}")
    if (index is None) == (folder is None):
        raise CbirError("name either a folder or an index (--index DIR)")
    t0 = time.time()
    seconds: Dict[str, float] = {}
    tmp = None
    try:
        if folder is not None:
            from .build import build_index
            from .folders import read_images

            entries = read_images(folder)
            out = Path(index_out) if index_out else Path(tempfile.mkdtemp(prefix="cbir-dups-")) / "index"
            tmp = None if index_out else out.parent
            build_index(entries, out, extractor=extractor, conf=conf, progress=progress, batch_size=batch_size, workers=workers,
                        roots=[folder], dataset={"folder": os.path.abspath(folder), "labels": None, "images": len(entries)})
            index = out
            seconds["describe"] = round(time.time() - t0, 3)
        from .query import Index

        idx = index if isinstance(index, Index) else Index(index)
        if extractor and folder is None:
            idx.check_extractor(extractor)
        names = [str(n) for n in idx.names]
        paths = [str(p) for p in idx.paths]
        n = len(names)
        thr = float(threshold) if threshold is not None else threshold_for(idx.extractor_name, verify)
        if not near or thr > 1.0:
            near = False
        t = time.time()
        hashes = content_hashes(idx.folder, names, paths, progress=progress)
        by_hash: Dict[str, List[int]] = {}
        for r, h in enumerate(hashes):
            if h is not None:
                by_hash.setdefault(h, []).append(r)
        ei = [g[0] for g in by_hash.values() for _ in g[1:]]
        ej = [x for g in by_hash.values() for x in g[1:]]
        seconds["hash"] = round(time.time() - t, 3)
        t = time.time()
        if near and n > 1:
            ni, nj, ns = near_pairs(lambda v, kk, ex: idx.search(v, kk, exclude=ex), idx.query_vectors, n, thr, k=k, progress=progress)
        else:
            ni = nj = np.zeros(0, np.int64)
            ns = np.zeros(0, np.float32)
        seconds["search"] = round(time.time() - t, 3)
        exact = {(min(a, b), max(a, b)) for a, b in zip(ei, ej)}
        pairs: Dict[Tuple[int, int], Dict[str, Any]] = {}
        for a, b in sorted(exact):
            pairs[(a, b)] = {"exact": True, "score": 1.0}
        cand = [(int(a), int(b), float(s)) for a, b, s in zip(ni, nj, ns) if (int(a), int(b)) not in exact]
        n_candidates = len(cand)
        t = time.time()
        if verify and cand:
            v = PairVerifier(min_inliers=min_inliers)
            pb = _progress(total=len(cand), desc="duplicates: verify", enabled=progress)
            for a, b, s in cand:
                r = v(paths[a], paths[b])
                if r["verified"]:
                    pairs[(a, b)] = {"exact": False, "score": round(s, 4), "inliers": r["inliers"], "mirrored": r["mirrored"]}
                pb.update()
            pb.close()
            seconds["verify"] = round(time.time() - t, 3)
        else:
            for a, b, s in cand:
                pairs[(a, b)] = {"exact": False, "score": round(s, 4)}
        keys = list(pairs)
        comps = components(n, np.array([a for a, _ in keys], np.int64), np.array([b for _, b in keys], np.int64))
        groups = []
        for c in comps:
            members = sorted((int(r) for r in c), key=lambda r: natural_key(names[r]))
            facts = [_file_facts(paths[r]) for r in members]
            kp = choose_keep([names[r] for r in members], facts, keep)
            order = [members[kp]] + [r for r in members if r != members[kp]]
            inside = set(members)
            gp = [{"a": names[a], "b": names[b], **pairs[(a, b)]} for a, b in keys if a in inside and b in inside]
            kinds = {p["exact"] for p in gp}
            groups.append({
                "images": [names[r] for r in order], "keep": names[members[kp]],
                "kind": "exact" if kinds == {True} else ("near" if kinds == {False} else "exact+near"),
                "min_score": round(min(p["score"] for p in gp), 4),
                "files": [{"name": names[r], "path": paths[r], **facts[members.index(r)]} for r in order],
                "pairs": gp,
            })
        groups.sort(key=lambda g: natural_key(g["images"][0]))
        return {
            "source": str(folder) if folder is not None else str(idx.folder),
            "index": str(idx.folder) if (folder is None or index_out) else None,
            "extractor": idx.extractor_name, "metric": idx.metric, "threshold": thr, "k": int(k), "verify": bool(verify),
            "min_inliers": int(min_inliers) if verify else None,
            "keep_rule": keep, "n_images": n, "n_groups": len(groups),
            "n_redundant": int(sum(len(g["images"]) - 1 for g in groups)),
            "n_exact_pairs": len(exact), "n_near_candidates": n_candidates,
            "n_near_pairs": int(sum(1 for p in pairs.values() if not p["exact"])),
            "groups": groups, "seconds": {**seconds, "total": round(time.time() - t0, 3)},
        }
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def write_csv(report: Dict[str, Any], path: PathLike) -> None:
    """One row per image of each group: group, name, keep, kind, width, height, bytes, mtime, path."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["group", "name", "keep", "kind", "width", "height", "bytes", "mtime", "path"])
        for gi, g in enumerate(report["groups"]):
            for fi in g["files"]:
                w.writerow([gi, fi["name"], int(fi["name"] == g["keep"]), g["kind"], fi["width"], fi["height"], fi["bytes"],
                            fi["mtime"], fi["path"]])


def draw_groups(report: Dict[str, Any], out_png: PathLike, max_groups: int = 40, max_per_group: int = 8) -> int:
    """A contact sheet: one row per group, the image to keep first (green frame); returns the groups drawn."""
    from .data import decode_image
    from .eval.plots import pyplot

    groups = report["groups"][:max_groups]
    if not groups:
        return 0
    plt = pyplot()
    cols = min(max_per_group, max(len(g["files"]) for g in groups))
    fig, axes = plt.subplots(len(groups), cols, figsize=(2.2 * cols, 2.4 * len(groups)), squeeze=False)
    for gi, g in enumerate(groups):
        for ci in range(cols):
            ax = axes[gi][ci]
            ax.axis("off")
            if ci >= len(g["files"]):
                continue
            fi = g["files"][ci]
            try:
                ax.imshow(decode_image(fi["path"], max_side=256))
            except DecodeError:
                ax.text(0.5, 0.5, "unreadable", ha="center", va="center")
            title = ("KEEP " if ci == 0 else "") + os.path.basename(fi["name"])
            if fi["width"]:
                title += f"\n{fi['width']}x{fi['height']}"
            ax.set_title(title[:40], fontsize=7, color="green" if ci == 0 else "black")
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    if len(report["groups"]) > max_groups:
        _log(f"note: the grid shows the first {max_groups} of {len(report['groups'])} groups")
    return len(groups)
