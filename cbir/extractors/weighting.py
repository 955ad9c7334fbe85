"""Foreground weighting of ``pooled`` (its ``weighting`` option): GeM with each location weighted by a semantic head's
class map (:mod:`cbir.extractors.classmap`), as :meth:`PooledExtractor.location_weights
<cbir.extractors.pooled.PooledExtractor.location_weights>` asks for it.

* :func:`normalise_weighting`: the option as given -> a normalised spec and the head's absolute path;
* :func:`mapper_for`: one cached :class:`~cbir.extractors.classmap.ClassMapper` per head file and window;
* :func:`shared_maps`: whether the extractor's own feature maps can stand in for the mapper's backbone;
* :func:`weight_maps`: the weights of a batch on each pooled stage's grid.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import CbirError
from .classmap import ClassMapper, check_window

__all__ = ["WEIGHTING_MODES", "WEIGHTING_WINDOW", "normalise_weighting", "mapper_for", "shared_maps", "weight_maps"]

#: cells per side of the neighbourhood each location's descriptor pools, for weighting: 1, the sharper map retrieves
#: better than class maps' 3 (corel1k P@10 0.844 vs 0.808; benchmarks/results/fcn_weighting.json)
WEIGHTING_WINDOW = 1
#: ``pooled`` foreground weighting modes: the weight of a location is
#: ``predicted``: the probability of the image's predicted class (global head output) there;
#: ``confidence``: the probability of the class predicted there (its own argmax);
#: ``nonbackground``: 1 - the probability of the head's background class.
WEIGHTING_MODES = ("predicted", "confidence", "nonbackground")

_MAPPERS: Dict[Tuple[str, float, Any], ClassMapper] = {}


def normalise_weighting(weighting, head: Optional[str]) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """``pooled``'s ``weighting`` option -> (spec, absolute head path), or (None, None) when off.

    Accepted: ``None``; a mode string (``predicted``, ``confidence``, ``nonbackground``) with the head in
    ``weighting_head``; or ``{"head": PATH, "mode": ..., "window": 1, "background": "background"}``.
    """
    if weighting in (None, False, "", "none"):
        return None, None
    if isinstance(weighting, str):
        weighting = {"mode": weighting}
    if not isinstance(weighting, dict):
        raise CbirError(f"pooled: weighting must be null, a mode {WEIGHTING_MODES} or a dict, got {weighting!r}")
    spec = dict(weighting)
    head = spec.pop("head", None) or head
    unknown = sorted(set(spec) - {"mode", "window", "background"})
    if unknown:
        raise CbirError(f"pooled: unknown weighting option(s) {unknown}; options: head, mode, window, background")
    mode = spec.get("mode", "predicted")
    if mode not in WEIGHTING_MODES:
        raise CbirError(f"pooled: weighting mode {mode!r}; choose one of {WEIGHTING_MODES}")
    if not head:
        raise CbirError('pooled: weighting needs a head: {"weighting": {"head": "HEAD.h5", "mode": "predicted"}} (make one with `cbir train`)')
    if head.startswith("@"):
        raise CbirError(f"pooled: weighting head {head!r} is an index reference; load the index to resolve it")
    head = os.path.abspath(head)
    if not os.path.isfile(head):
        raise CbirError(f"{head}: head file not found (make one with `cbir train`)")
    out = {"mode": mode, "window": check_window(spec.get("window", WEIGHTING_WINDOW))}
    if mode == "nonbackground":
        from .semantic import load_head

        out["background"] = bg = str(spec.get("background") or "background")
        h = load_head(head)
        if bg not in h["classes"] and bg not in (h.get("label_names") or {}).values():
            raise CbirError(f"{head}: weighting mode nonbackground needs a background class {bg!r}; the head has {h['classes']}")
    return out, head


def shared_maps(pooled, mapper: ClassMapper, size: Tuple[int, int]) -> Optional[Dict[str, int]]:
    """Stage strides when ``pooled``'s feature maps can stand in for the mapper's (same backbone and weights,
    the image not shrunk further by the head's pooled part), else ``None``."""
    cnn = [e for e, _ in mapper.parts if e.name == "pooled"]
    if len(cnn) != 1:
        return None
    e = cnn[0]
    if e.conf["backbone"] != pooled.conf["backbone"] or e.conf["weights"] != pooled.conf["weights"]:
        return None
    if e.max_side and max(size) > e.max_side:
        return None
    if any(s not in pooled.net.stages for s in e.stages):
        return None
    return mapper.stage_strides(e)


def mapper_for(head: str, window: Optional[int]) -> ClassMapper:
    """A cached mapper per (head file, its mtime, window): extraction reuses the loaded backbone."""
    key = (head, os.path.getmtime(head), window)
    if key not in _MAPPERS:
        _MAPPERS.clear()
        _MAPPERS[key] = ClassMapper(head, window=window)
    return _MAPPERS[key]


def weight_maps(mapper: ClassMapper, batch, spec: Dict[str, Any], sizes: Dict[str, Tuple[int, int]],
                maps: Optional[Dict[str, Any]] = None, strides: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """``{stage: (B, 1, h, w)}`` location weights from ``mapper``'s class map of a float batch ``(B, 3, H, W)`` in [0, 1].

    ``spec``: a normalised weighting (:func:`normalise_weighting`). With ``maps`` and ``strides``
    (the caller's backbone is the head's: same maps), the coarse weights are upsampled exactly onto
    each stage's grid; otherwise they are upsampled to the image and resized to each stage.
    """
    import torch
    import torch.nn.functional as F

    from .upsample import upsample_renormalised

    images = [np.ascontiguousarray(t) for t in (batch * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()]
    win = check_window(spec.get("window", WEIGHTING_WINDOW))
    mode = spec["mode"]
    (desc, glob), stride = mapper.descriptors_for_windows(images, [win, None], maps=maps)
    with torch.inference_mode():
        prob = torch.softmax(mapper.apply_head(desc), dim=1)
        if mode == "predicted":
            cls = mapper.apply_head(glob[:, :, :1, :1]).argmax(1).view(-1)
            wmap = prob[torch.arange(len(images)), cls].unsqueeze(1)
        elif mode == "confidence":
            wmap = prob.amax(1, keepdim=True)
        elif mode == "nonbackground":
            wmap = 1.0 - prob[:, mapper.class_index(spec["background"])].unsqueeze(1)
        else:
            raise CbirError(f"weighting mode {mode!r}; choose one of {WEIGHTING_MODES}")
        # GeM divides by the weights' sum, so only their pattern counts: scale each image's map to a
        # maximum of 1 (a map that is ~0 everywhere, e.g. all background, keeps its pattern; all 0: uniform)
        wmap = wmap.clamp(min=0.0)
        top = wmap.amax((-2, -1), keepdim=True)
        wmap = torch.where(top > 0, wmap / top.clamp(min=1e-30), torch.ones_like(wmap))
        out = {}
        S = int(round(stride))
        if maps is not None and strides is not None and S == stride:
            for s, (h, w) in sizes.items():
                r = S // strides[s]
                out[s] = upsample_renormalised(wmap, r)[..., :h, :w]
        else:
            H, W = images[0].shape[:2]
            Hp, Wp = round(H * S / stride), round(W * S / stride)  # the size the head's CNN saw
            full = upsample_renormalised(wmap, S)[..., :Hp, :Wp]
            if (Hp, Wp) != (H, W):
                full = F.interpolate(full, size=(H, W), mode="bilinear", align_corners=False)
            for s, (h, w) in sizes.items():
                out[s] = F.interpolate(full, size=(h, w), mode="area") if (h, w) != (H, W) else full
    return out
