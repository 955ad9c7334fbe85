"""Training a semantic (softmax) head on frozen base descriptors of a labelled list: ``cbir train``."""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional, Sequence, Union

import numpy as np

from ..data import Entry, batches, dedupe, iter_decoded
from ..errors import CbirError
from ..index.manifest import now_iso
from ..progress import bar as _progress, log as _log
from .base import make_extractor

PathLike = Union[str, os.PathLike]


def train_head(
    entries: Sequence[Entry],
    out: PathLike,
    base: str = "fused",
    base_conf: Optional[Dict[str, Any]] = None,
    epochs: int = 300,
    hidden: int = 0,
    weight_decay: float = 1e-2,
    flip: bool = True,
    progress: bool = True,
    workers: int = 2,
    batch_size: int = 16,
    label_names: Optional[Dict[str, str]] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Fit a softmax classifier head on frozen ``base`` descriptors of labelled ``entries`` and save it.

    The head file (HDF5) records the base extractor's config, so ``--extractor semantic --head FILE``
    describes images exactly as the head was trained.
    """
    from .semantic import fit_head, save_head

    entries = [e for e in dedupe(entries)[0]]
    if any(e.label is None for e in entries):
        raise CbirError("training a head needs a label for every image")
    if base == "fused" and base_conf is None:
        from . import HEAD_BASE_PARTS

        base_conf = {"parts": HEAD_BASE_PARTS}
    ext = make_extractor(base, base_conf or {})
    if ext.needs_fit:
        raise CbirError(f"base extractor {ext.name!r} learns a codebook on the gallery; pick a base without one for a head")
    t0 = time.time()
    feats, labels, failures = [], [], []
    pb = _progress(total=len(entries), desc=f"train: extract {ext.name}", enabled=progress)
    for kind, item in batches(iter_decoded(entries, ext.max_side, workers=workers), batch_size):
        if kind == "error":
            _, e, err = item
            failures.append({"path": str(e.path), "cause": err.cause})
            _log(f"skipped {e.path}: {err.cause}", pb)
            pb.update()
            continue
        imgs = [img for _, _, img in item]
        f = ext.describe(imgs)
        feats.append(f)
        labels += [e.label for _, e, _ in item]
        if flip:
            feats.append(ext.describe([np.ascontiguousarray(im[:, ::-1]) for im in imgs]))
            labels += [e.label for _, e, _ in item]
        pb.update(len(item))
    pb.close()
    t_extract = time.time() - t0
    X = np.concatenate(feats)
    t0 = time.time()
    head = fit_head(X, labels, hidden=hidden, epochs=epochs, weight_decay=weight_decay, seed=seed)
    head["base"] = {"name": ext.name, "conf": ext.conf, "weights": ext.weights()}
    head["label_names"] = label_names or {}
    head["train"] = {"images": len(entries) - len(failures), "failures": failures, "flip": flip,
                     "train_accuracy": head.pop("train_accuracy"), "seconds_extract": round(t_extract, 2),
                     "seconds_fit": round(time.time() - t0, 2), "created": now_iso()}
    save_head(head, out)
    return {"out": str(out), "classes": head["classes"], **head["train"]}
