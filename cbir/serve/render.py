"""What the routes draw and summarise: JPEG thumbnails, the match overlay PNG, an index's summary for ``/info``, and
the file names of uploads."""

from __future__ import annotations

import io
import re
import time
from typing import Any, Dict

import numpy as np

from ..errors import CbirError


def safe_file_name(filename: str) -> str:
    """The last part of an upload's file name with anything but letters, digits, '.', '-' and '_' replaced."""
    base = re.split(r"[\\/]", filename)[-1]
    base = re.sub(r"[^\w.\-]+", "_", base).strip("._") or "image"
    return base[:100]


def image_format(data: bytes, label: str) -> str:
    """The upload's format (JPEG, PNG...) after a full decode with cbir's limits (raises DecodeError)."""
    from PIL import Image

    from ..data import decode_bytes

    decode_bytes(data, name=label, max_side=64)
    with Image.open(io.BytesIO(data)) as im:
        return str(im.format or "")


def jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def overlay_png(img0: np.ndarray, img1: np.ndarray, result: Dict[str, Any]) -> bytes:
    """The figure of ``cbir match --out``: matches side by side, and the warped overlay when a homography was found."""
    import cv2

    from ..local.draw import GAP, matches_panel, overlap_panel

    panels = [matches_panel(img0, img1, result)]
    if result.get("homography") is not None:
        p = overlap_panel(img0, img1, result["homography"])
        if p is not None:
            panels.append(p)
    width = max(p.shape[1] for p in panels)
    rows = []
    for p in panels:
        row = np.full((p.shape[0] + GAP, width, 3), 255, np.uint8)
        row[: p.shape[0], : p.shape[1]] = p
        rows.append(row)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.concatenate(rows)[:-GAP], cv2.COLOR_RGB2BGR))
    if not ok:
        raise CbirError("could not encode the match figure as PNG")
    return buf.tobytes()


def summary(slot) -> Dict[str, Any]:
    """``/info``'s entry of an :class:`~cbir.serve.state.IndexSlot`: manifest summary, labels, reload state."""
    from ..index.backend import index_summary
    from .service import default_reranker

    loaded = slot.current  # /info answers while a version is refused (changed in place) and says so
    m = loaded.manifest
    try:
        s = index_summary(m, loaded.folder)
    except (OSError, CbirError, KeyError, ValueError):  # the folder was replaced after this version was opened
        s = {"count": m.get("count"), "dim": m.get("dim"), "metric": m.get("metric")}
    s.pop("index", None)
    s.pop("file_bytes", None)
    labels = list(m.get("labels") or [])
    return {**s, "name": slot.name, "folder": slot.folder.name, "extractor": (m.get("extractor") or {}).get("name"),
            "created": m.get("created"), "updated": m.get("updated"), "dataset": (m.get("dataset") or {}).get("name"),
            "labels": labels, "label_names": m.get("label_names") or {}, "local_features": loaded.local_features,
            "rerank_matcher": default_reranker(loaded.local_features),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded.loaded_at)), "reloads": slot.reloads,
            "reload_error": slot.reload_error, "changed_in_place": slot.changed_in_place(loaded)}
