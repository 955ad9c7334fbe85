"""``cbir match``: match two images with local features, verify, print JSON or a summary, draw a figure.

    cbir match img1.png img2.png --features aliked --matcher lightglue --json
    cbir match a.jpg b.jpg --features sift --matcher kdtree --model affine --out matches.png
    cbir match a.jpg b.jpg --recipe delf --features aliked      # seed 000's kd-tree + affine recipe
    cbir match a.jpg b.jpg --features none --matcher loftr --weights outdoor_ds.ckpt
    cbir match --list

Registered by ``cbir.cli`` through :func:`register`; errors are :class:`~cbir.errors.CbirError` and the main CLI
prints them as one line.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, List, Optional

ARRAY_KEYS = ("mkpts0", "mkpts1", "match_scores", "inliers")


def parse_options(items: Optional[List[str]], what: str) -> Dict[str, Any]:
    """``KEY=VALUE`` strings -> dict; values are read as JSON when they parse (numbers, true/false, null, lists)."""
    from ..errors import CbirError

    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise CbirError(f"{what}: expected KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def register(sub, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``match`` sub-command to the main parser's sub-parsers."""
    from ..cliutil import non_negative_int

    m = sub.add_parser(
        "match",
        help="match two images with local features and verify them geometrically",
        description="Extract local features, match them, fit a homography / affine / fundamental model; prints the inliers "
        "and the model (--json for everything), optionally draws the matches and the warped overlap (--out).",
    )
    m.add_argument("image0", nargs="?", help="first image (the model maps it onto the second)")
    m.add_argument("image1", nargs="?", help="second image")
    m.add_argument("--features", default="aliked", help="local features: sift, rootsift, aliked, aliked-n16rot, disk, xfeat, superpoint, delf; none for loftr (default: %(default)s)")
    m.add_argument("--matcher", default="lightglue", help="mnn, kdtree, lightglue, lighterglue (xfeat), superglue (superpoint), loftr (default: %(default)s)")
    m.add_argument("--model", default="homography", choices=["homography", "affine", "fundamental"])
    m.add_argument("--recipe", choices=["delf"], help="delf: kd-tree matching within 0.8 and affine RANSAC (20 px, 1000 trials), seed 000")
    m.add_argument("--weights", metavar="PATH", help="weight file of the features (superpoint_v1.pth...) or of a detector-free matcher")
    m.add_argument("--matcher-weights", metavar="PATH", help="weight file of the matcher (superglue_outdoor.pth...)")
    m.add_argument("--max-side", type=non_negative_int, default=1024, help="shrink longer sides to this for the networks; results stay in the input frame (default: %(default)s; 0: never)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--conf", nargs="*", metavar="KEY=VALUE", help="options of the features, e.g. max_keypoints=4096")
    m.add_argument("--matcher-conf", nargs="*", metavar="KEY=VALUE", help="options of the matcher, e.g. ratio_threshold=0.8")
    m.add_argument("--verify-conf", nargs="*", metavar="KEY=VALUE", help="options of the model fit, e.g. method=magsac threshold=3")
    m.add_argument("--verdict-conf", nargs="*", metavar="KEY=VALUE", help="the rule a model must pass to be 'verified': min_inliers (15), "
                   "min_inlier_ratio (0.05), max_scale (8), min_spread (0.002)")
    m.add_argument("--out", metavar="PNG", help="draw the matches (and the warped overlap when a homography is found)")
    m.add_argument("--json", action="store_true", help="print the result as JSON")
    m.add_argument("--with-matches", action="store_true", help="with --json: include the matched points and inlier flags")
    m.add_argument("--list", action="store_true", help="list local features and matchers and exit")
    m.add_argument("--runtime", choices=["torch", "onnx"], help="run the networks in torch (default) or onnxruntime (cbir[onnx]; see "
                   "`cbir export onnx`); lightglue then runs every layer, without adaptive pruning")
    add_common(m)
    m.set_defaults(func=cmd_match)


def cmd_match(a) -> int:
    from ..errors import CbirError
    from ..local import extractor_names, matcher_names
    from ..local.pair import match_files

    if a.list:
        print("features:", ", ".join(extractor_names()))
        print("matchers:", ", ".join(matcher_names()))
        print("learned matchers: lightglue (aliked, aliked-n16rot, disk; superpoint with user weights), lighterglue (xfeat), "
              "superglue (superpoint), loftr (features none)")
        from ..local.confs import local_names, rerank_names

        print("named local features (index build --local):", ", ".join(local_names()))
        print("named re-rankers (--rerank):", ", ".join(rerank_names()))
        return 0
    if not a.image0 or not a.image1:
        raise CbirError("cbir match needs two images (or --list)")
    features = None if str(a.features).lower() in ("none", "") else a.features
    matcher, model = a.matcher, a.model
    matcher_conf = parse_options(a.matcher_conf, "--matcher-conf")
    verify_conf = parse_options(a.verify_conf, "--verify-conf")
    if a.recipe == "delf":
        from ..local.delf import DELF_RECIPE

        matcher, model = DELF_RECIPE["matcher"], DELF_RECIPE["model"]
        matcher_conf = {**DELF_RECIPE["matcher_conf"], **matcher_conf}
        verify_conf = {**DELF_RECIPE["verify_conf"], **verify_conf}
    detector_free = features is None
    result = match_files(
        a.image0, a.image1, features=features, matcher=matcher, model=model,
        out_png=a.out,
        weights=None if detector_free else a.weights,
        matcher_weights=a.weights if detector_free and not a.matcher_weights else a.matcher_weights,
        max_side=a.max_side or None, device=a.device,
        extractor_conf=parse_options(a.conf, "--conf") or None,
        matcher_conf=matcher_conf or None, verify_conf=verify_conf or None,
        verdict_rule=parse_options(a.verdict_conf, "--verdict-conf") or None,
    )
    if a.json:
        shown = result if a.with_matches else {k: v for k, v in result.items() if k not in ARRAY_KEYS}
        print(json.dumps(shown, indent=2))
        return 0
    print(f"{result['image0']} -> {result['image1']}: {result['features'] or ''}+{result['matcher']}, {result['model']}")
    print(f"  keypoints {result['n_keypoints0']} / {result['n_keypoints1']}, matches {result['n_matches']}, inliers {result['n_inliers']}")
    v = result["verdict"]
    rule = v["rule"]
    print(f"  verified: {'yes' if result['verified'] else 'no (' + str(v['reason']) + ')'}  [rule: >= {rule['min_inliers']} inliers, "
          f"inlier ratio >= {rule['min_inlier_ratio']}, a well-conditioned model]")
    if result["model_matrix"] is not None:
        for row in result["model_matrix"]:
            print("  " + "  ".join(f"{v: .6g}" for v in row))
    else:
        print("  no model (too few matches or no consistent geometry)")
    s = result["seconds"]
    print(f"  seconds: extract {s['extract']}, match {s['match']}, verify {s['verify']}")
    if a.out:
        print(f"  figure: {result['figure']}")
    return 0
