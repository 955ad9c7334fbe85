"""``cbir duplicates FOLDER | --index DIR``: groups of exact and near-duplicate images; nothing is deleted or moved."""

from __future__ import annotations

import json
import sys

from ..cliutil import positive_int, tty_safe
from ..errors import CbirError

from .common import add_common, add_search_params


def cmd_duplicates(a) -> int:
    from ..duplicates import draw_groups, find_duplicates, write_csv

    if (a.folder is None) == (a.index is None):
        raise CbirError("name the images once: a FOLDER or --index DIR")
    if a.threshold is not None and not (-1.0 <= a.threshold <= 1.0):
        raise CbirError(f"--threshold {a.threshold}: a similarity between -1 and 1 (cosine; 1 - Hamming distance / bits)")
    conf = None
    if a.folder is not None and a.extractor:
        from ..extractors import configure

        a.extractor, conf = configure(a.extractor)
    index = None
    if a.index is not None:
        from ..query import Index

        index = Index(a.index)
        index.set_search(nprobe=a.nprobe, ef=a.ef)
    rep = find_duplicates(index=index, folder=a.folder, threshold=a.threshold, k=a.k, verify=a.verify, keep=a.keep,
                          progress=not a.quiet, extractor=a.extractor, conf=conf, index_out=a.index_out,
                          batch_size=a.batch_size, workers=a.workers, min_inliers=a.min_inliers)
    if a.csv:
        write_csv(rep, a.csv)
        print(f"csv written to {tty_safe(a.csv)}", file=sys.stderr)
    if a.grid:
        drawn = draw_groups(rep, a.grid)
        print(f"grid of {drawn} group(s) written to {tty_safe(a.grid)}" if drawn else "no group to draw: no grid written", file=sys.stderr)
    if a.json is not None:
        text = json.dumps(rep, indent=2)
        if a.json == "-":
            print(text)
            return 0
        from ..index.atomic import write_json_atomic

        write_json_atomic(rep, a.json)
        print(f"json written to {tty_safe(a.json)}", file=sys.stderr)
    print(tty_safe(f"{rep['source']}: {rep['n_images']} images, {rep['n_groups']} group(s) of duplicates, {rep['n_redundant']} "
                   f"redundant copies ({rep['n_exact_pairs']} exact pairs, {rep['n_near_pairs']} near pairs at similarity >= "
                   f"{rep['threshold']:g} with {rep['extractor']}{', verified' if rep['verify'] else ''}); nothing was changed"))
    for gi, g in enumerate(rep["groups"]):
        print(f"group {gi + 1} ({g['kind']}, {len(g['images'])} images, min similarity {g['min_score']:.3f})")
        for fi in g["files"]:
            size = f"{fi['width']}x{fi['height']}" if fi["width"] else "?"
            print(f"  {'keep' if fi['name'] == g['keep'] else '    '}  {size:>11}  {tty_safe(fi['name'])}")
    return 0


def register(sub, add_common=None) -> None:
    """Add this module's sub-command(s) to the main parser."""
    from ..duplicates import CANDIDATE_THRESHOLDS, DEFAULT_K, KEEP_RULES, MIN_INLIERS, THRESHOLDS

    measured = "; ".join(f"{k} {CANDIDATE_THRESHOLDS[k]:g} verified, {THRESHOLDS[k]:g} with --no-verify" for k in sorted(THRESHOLDS))
    d = sub.add_parser("duplicates", help="find exact and near-duplicate images in a folder or an index (deletes nothing)",
                       description="Group exact duplicates (same SHA-256) and near duplicates (re-encoded, resized, cropped, "
                                   "recoloured, lightly edited copies: pairs from the index's own k-nearest-neighbour search whose "
                                   "descriptor similarity is at or above the threshold, confirmed by local features + RANSAC unless "
                                   "--no-verify). Each group names the image to keep first. "
                                   f"Default thresholds, measured per extractor by benchmarks/duplicates.py: {measured}. "
                                   "Nothing is deleted or moved.")
    d.add_argument("folder", nargs="?", metavar="FOLDER", help="a folder of images (described into a temporary index with "
                   "--extractor, the default one unless given); or use --index")
    d.add_argument("--index", metavar="DIR", help="an index: its gallery images, with its own extractor and search")
    d.add_argument("--threshold", type=float, metavar="S", help=f"descriptor similarity from which a pair is a candidate (verified) or a "
                   f"near duplicate (--no-verify); default: the one measured for the index's extractor: {measured}")
    d.add_argument("--k", type=positive_int, default=DEFAULT_K, help="neighbours searched per image (default: %(default)s)")
    v = d.add_mutually_exclusive_group()
    v.add_argument("--verify", dest="verify", action="store_true", default=True, help="confirm each candidate pair with local "
                   "features + RANSAC (RootSIFT, mutual NN, homography; mirrored copies tried mirrored): the same scene, not merely "
                   "similar (the default: measured F1 far above descriptors alone, see README)")
    v.add_argument("--no-verify", dest="verify", action="store_false", help="decide by descriptor similarity alone (faster on "
                   "very large galleries, less precise)")
    d.add_argument("--min-inliers", type=positive_int, default=MIN_INLIERS, help="RANSAC inliers a verified pair needs (default: "
                   "%(default)s, measured: copies keep most keypoints, other shots of the same scene fewer)")
    d.add_argument("--keep", choices=KEEP_RULES, default="largest", help="the image each group keeps: largest (most pixels, then "
                   "bytes), oldest (mtime) or first (name order) (default: %(default)s)")
    d.add_argument("--json", nargs="?", const="-", metavar="FILE", help='write {"groups": [{"images": [...], "keep": name, ...}], '
                   '...} to FILE (alone: to stdout, instead of the text)')
    d.add_argument("--csv", metavar="FILE", help="one row per image of each group: group, name, keep, kind, width, height, bytes, mtime, path")
    d.add_argument("--grid", metavar="PNG", help="a contact sheet: one row per group, the image to keep first")
    d.add_argument("--extractor", metavar="NAME", help="with FOLDER: the descriptor (default: the default extractor); with --index: "
                   "refuse unless the index has it")
    d.add_argument("--index-out", metavar="DIR", help="with FOLDER: keep the index made for it here (then `cbir index sync` and "
                   "`cbir duplicates --index DIR` reuse it)")
    d.add_argument("--batch-size", type=positive_int, default=16, help="images per network batch (default: %(default)s)")
    d.add_argument("--workers", type=positive_int, default=2, help="image decoding threads (default: %(default)s)")
    add_search_params(d)
    add_common(d)
    d.set_defaults(func=cmd_duplicates)
