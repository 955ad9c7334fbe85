"""``cbir segment``: a semantic head applied at every location of an image (FCN-32s, seed 004).

    cbir segment photo.jpg --head heads/corel.h5 --out photo_classes.png
    cbir segment photo.jpg --index indexes/corel-sem --json          # the index's copy of its head
    cbir segment photo.jpg --head heads/corel.h5 --window 1 --full-res --out fine.png

Draws the image and its per-pixel class map side by side (a discrete colour map over the classes
present, labelled with their names and area fractions); ``--json`` prints the class fractions.
Registered by ``cbir.cli`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Dict, List

import numpy as np


def register(sub, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add the ``segment`` sub-command to the main parser's sub-parsers."""
    from ..cliutil import non_negative_int, positive_int

    s = sub.add_parser(
        "segment",
        help="per-pixel class map of an image from a semantic head (fully convolutional use, bilinear upsampling)",
        description="Apply a head made by `cbir train` at every cell of the backbone's coarsest grid (32 px), upsample the "
        "class probabilities with a bilinear transposed convolution and take the per-pixel argmax. Draws the image and the "
        "class map side by side (--out) and/or prints the class fractions (--json).",
    )
    s.add_argument("image", help="an image file")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--head", metavar="FILE", help="a head made by `cbir train`")
    src.add_argument("--index", metavar="DIR", help="an index holding a head: a semantic index, or pooled with weighting")
    s.add_argument("--out", metavar="PNG", help="write the image and its class map side by side")
    s.add_argument("--json", action="store_true", help="print the class fractions (and the grid, stride, global prediction) as JSON")
    s.add_argument("--window", default="3", metavar="N", help="cells per side each location's descriptor pools (odd), or 'global' (default: %(default)s)")
    s.add_argument("--max-side", type=non_negative_int, default=1024, metavar="PX", help="decode the image with its longer side at most this; the map has this size (default: %(default)s; 0: as stored)")
    s.add_argument("--full-res", action="store_true", help="analyse the image at the decoded size instead of the head's training size (seed 004's full-resolution map)")
    s.add_argument("--chunk", type=positive_int, default=32, metavar="C", help="classes upsampled at a time (memory ~ H*W*(4*C + 40) bytes; default: %(default)s)")
    add_common(s)
    s.set_defaults(func=cmd_segment)


def _mapper_from_args(a):
    from ..errors import CbirError
    from ..extractors.classmap import ClassMapper

    window = None if str(a.window).lower() in ("global", "none", "image") else _int(a.window)
    if a.head:
        return ClassMapper(a.head, window=window), os.path.abspath(a.head)
    from ..engine import load_index

    idx = load_index(a.index)
    ext = idx.extractor
    if ext.name == "semantic" and ext.conf.get("head"):
        return ClassMapper(ext, window=window), str(idx.folder / "head.h5")
    if ext.name == "semantic":
        raise CbirError(f"{a.index}: its semantic descriptor is a classifier network's softmax, not a head made by "
                        "`cbir train`; class maps need such a head (pass --head FILE)")
    if ext.name == "pooled" and ext.conf.get("weighting"):
        return ClassMapper(ext.conf["weighting_head"], window=window), ext.conf["weighting_head"]
    raise CbirError(f"{a.index}: built with extractor {ext.name!r}, which holds no head; use a semantic index "
                    "(--extractor semantic) or pass --head FILE")


def _int(v: str) -> int:
    from ..errors import CbirError

    try:
        return int(v)
    except ValueError:
        raise CbirError(f"--window must be an odd number of cells or 'global', got {v!r}") from None


def class_fractions(mapper, labels: np.ndarray, conf: np.ndarray) -> List[Dict[str, Any]]:
    """One row per class present: id, label, name, fraction of the pixels, mean confidence; largest first."""
    ids, counts = np.unique(labels, return_counts=True)
    rows = []
    for i, c in zip(ids.tolist(), counts.tolist()):
        rows.append({"id": int(i), "label": mapper.classes[i], "name": mapper.class_name(i),
                     "fraction": round(c / labels.size, 4), "mean_confidence": round(float(conf[labels == i].mean()), 4)})
    return sorted(rows, key=lambda r: (-r["fraction"], r["id"]))


def draw(image: np.ndarray, labels: np.ndarray, rows: List[Dict[str, Any]], out: str, title: str = "") -> str:
    """The image and the class map side by side; a discrete colour map over the classes present, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    present = sorted(r["id"] for r in rows)
    pos = {c: i for i, c in enumerate(present)}
    palette = plt.get_cmap("tab20").colors if len(present) > 10 else plt.get_cmap("tab10").colors
    colours = [palette[i % len(palette)] for i in range(len(present))]
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    for c, i in pos.items():
        lut[c] = i
    H, W = labels.shape
    fig_w = 12.0
    fig, axes = plt.subplots(1, 2, figsize=(fig_w, fig_w / 2 * H / W + 1.2), squeeze=True)
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(lut[labels], cmap=ListedColormap(colours), vmin=-0.5, vmax=len(present) - 0.5, interpolation="nearest")
    axes[1].set_title("class map")
    for ax in axes:
        ax.set_axis_off()
    by_id = {r["id"]: r for r in rows}
    handles = [Patch(color=colours[pos[c]], label=f"{by_id[c]['name']} ({100 * by_id[c]['fraction']:.1f}%)") for c in present]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), frameon=False, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(handles) - 1) // 5), 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def cmd_segment(a) -> int:
    from ..data import decode_image
    from ..errors import CbirError

    if not a.out and not a.json:
        raise CbirError("cbir segment: pass --out PNG and/or --json")
    mapper, head_path = _mapper_from_args(a)
    image = decode_image(a.image, max_side=a.max_side or None)
    labels, conf, info = mapper.class_map(image, analyse=not a.full_res, chunk=a.chunk)
    rows = class_fractions(mapper, labels, conf)
    g = info.pop("global")
    top = g["id"]
    result = {"image": str(a.image), "head": head_path, **info,
              "predicted": {"id": top, "label": mapper.classes[top], "name": mapper.class_name(top), "probability": g["probability"]},
              "classes": rows}
    if a.out:
        title = f"{os.path.basename(a.image)}: predicted {result['predicted']['name']} ({result['predicted']['probability']:.2f}); " \
                f"grid {info['grid'][0]}x{info['grid'][1]}, stride {info['stride']:g} px, window {info['window'] or 'global'}"
        result["figure"] = draw(image, labels, rows, a.out, title)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{a.image}: predicted {result['predicted']['name']} (p={result['predicted']['probability']:.3f}); "
              f"grid {info['grid'][0]}x{info['grid'][1]}, stride {info['stride']:g} px")
        for r in rows:
            print(f"  {r['name']:<24} {100 * r['fraction']:5.1f}%  (mean confidence {r['mean_confidence']:.2f})")
        if a.out:
            print(f"figure: {a.out}")
    return 0
