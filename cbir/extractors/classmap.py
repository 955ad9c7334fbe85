"""Dense class maps: a global classifier head applied at every location (FCN-32s, seed 004).

cbir's semantic heads (``cbir train``) classify a *global* base descriptor: by default ``fused`` of
[GeM over ALIKED-n16's four blocks, each L2-normalised; HSV colour histogram]. :class:`ClassMapper`
builds the same descriptor for every cell of a grid at the coarsest backbone stride (32 px for
ALIKED and XFeat), so it lives in the same space as the global one:

* ``pooled`` parts: for each stage, ``relu(x)^p`` (GeM; ``x`` for GAP, max for max pooling) is summed
  over the cell's pixels of that stage (32x32 of block1, 16x16 of block2, 4x4 of block3, 1x1 of
  block4) together with the pixel count; a cell's descriptor is the GeM over a ``window`` x ``window``
  neighbourhood of cells (sums added, divided by the counts), L2-normalised per stage, concatenated,
  L2-normalised -- exactly what ``pooled`` computes for an image made of those cells;
* ``colour`` parts: the HSV histogram of the same neighbourhood (cell edges mapped onto the 256-px
  image the colour part sees; counted by :func:`~cbir.extractors.colour.cell_histograms`, the colour
  extractor's own code), square-rooted and L2-normalised;
* ``fused``: ``concat(sqrt(w_i) part_i)``, L2-normalised, as :class:`~cbir.extractors.fused.FusedExtractor`.

The head's standardisation and linear layers then run as 1x1 convolutions: ``(K, h, w)`` logits.
Invariant (tested): with ``window=None`` (the whole image) the scores are the global head output
``head_logits(head, base.describe([image]))``; for a colour-only head every cell of a constant image
scores exactly like the whole image.

``window=1`` gives the finest but least reliable map (a 32x32 cell's colour histogram is sparse, unlike
the training images'); class maps default to ``window=3`` (96 px neighbourhoods), pooled weighting to
``window=1`` (see :data:`DEFAULT_WINDOW`; measured by ``benchmarks/fcn_weighting.py``).

Upsampling to pixels: :func:`~cbir.extractors.upsample.argmax_upsample` (softmax at coarse resolution,
the classes that cannot win anywhere pruned exactly, the rest upsampled ``chunk`` classes at a time with
a running argmax -- memory ``~H*W*(4*chunk + 40)`` bytes whatever ``K``). The foreground weighting of
``pooled`` by these maps is :mod:`cbir.extractors.weighting`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CbirError

__all__ = [
    "ClassMapper",
    "class_scores",
    "class_map",
    "check_window",
    "DEFAULT_WINDOW",
]

#: cells per side of the neighbourhood a location's descriptor is pooled over (None: the whole image).
#: Class maps (``cbir segment``): 3, whose cells agree with the image's label more often (corel1k test
#: split: 66% of the cells vs 48% with 1); pooled weighting uses 1
#: (:data:`~cbir.extractors.weighting.WEIGHTING_WINDOW`). Figures in benchmarks/results/fcn_weighting.json.
DEFAULT_WINDOW = 3
#: grid stride for a head whose base has no CNN part (colour only)
COLOUR_ONLY_STRIDE = 32


# ------------------------------------------------------------------------------- colour counts per cell


def _colour_counts(image: np.ndarray, bins: Sequence[int], fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """``(nbins, gh, gw)`` float64 HSV histogram counts per cell (:func:`~cbir.extractors.colour.cell_histograms`, the
    colour extractor's own); ``fy``/``fx`` are the cell edges as fractions of the image."""
    from .colour import cell_histograms

    H, W = image.shape[:2]
    ey = np.round(fy * H).astype(np.int64)
    ex = np.round(fx * W).astype(np.int64)
    return cell_histograms(image, bins, ey, ex).transpose(2, 0, 1).astype(np.float64)



# ------------------------------------------------------------------------------- window sums


def _window_sum(t, window: Optional[int]):
    """Sum of ``(B, C, gh, gw)`` over ``window x window`` neighbourhoods (``None``: the whole grid, broadcast)."""
    import torch.nn.functional as F

    if window is None:
        return t.sum((-2, -1), keepdim=True).expand_as(t)
    if window == 1:
        return t
    return F.avg_pool2d(t, window, stride=1, padding=window // 2, divisor_override=1)


def _window_max(t, window: Optional[int]):
    import torch.nn.functional as F

    if window is None:
        return t.amax((-2, -1), keepdim=True).expand_as(t)
    if window == 1:
        return t
    return F.max_pool2d(t, window, stride=1, padding=window // 2)


def _l2n(x, dim: int = 1, eps: float = 1e-12):
    return x / x.norm(dim=dim, keepdim=True).clamp(min=eps)


def check_window(window) -> Optional[int]:
    """A window option as cells per side (a positive odd int) or ``None`` (the whole image: ``None``, "none",
    "global", "image")."""
    if window is None or (isinstance(window, str) and window.lower() in ("none", "global", "image")):
        return None
    if isinstance(window, bool) or int(window) != window or int(window) < 1 or int(window) % 2 == 0:
        raise CbirError(f"window must be a positive odd number of cells or None (the whole image), got {window!r}")
    return int(window)


# ------------------------------------------------------------------------------- the mapper


class ClassMapper:
    """A semantic head applied at every cell of a grid: ``(K, h, w)`` logits, then a per-pixel class map.

    ``head``: a head file (``cbir train``), a head dict (:func:`~cbir.extractors.semantic.load_head`), a
    ``semantic`` extractor, or a ``pooled`` extractor with ``weighting`` (its head is used).
    """

    def __init__(self, head, window: Optional[int] = DEFAULT_WINDOW) -> None:
        from .base import make_extractor
        from .semantic import load_head

        self.head_path: Optional[str] = None
        if isinstance(head, ClassMapper):
            head = head.head
        elif isinstance(head, (str, os.PathLike)):
            self.head_path = os.path.abspath(head)
            head = load_head(head)
        elif hasattr(head, "head") and isinstance(getattr(head, "head"), dict):  # SemanticExtractor
            self.head_path = getattr(head, "conf", {}).get("head")
            head = head.head
        elif hasattr(head, "conf") and (getattr(head, "conf", {}) or {}).get("weighting_head"):  # weighted pooled
            self.head_path = head.conf["weighting_head"]
            head = load_head(self.head_path)
        if not isinstance(head, dict) or "layers" not in head:
            raise CbirError(f"ClassMapper needs a head file, a head dict or a semantic extractor, got {type(head).__name__}")
        self.head: Dict[str, Any] = head
        self.window = check_window(window)
        b = head["base"]
        self.base = make_extractor(b["name"], b["conf"])
        if self.base.name == "fused":
            parts = list(zip(self.base.parts, self.base.w))
        elif self.base.name in ("pooled", "colour"):
            parts = [(self.base, 1.0)]
        else:
            raise CbirError(f"class maps: the head's base {self.base.name!r} has no per-location form (fused of pooled/colour, pooled or colour)")
        for e, _ in parts:
            if e.name == "pooled":
                if [float(s) for s in e.conf["scales"]] != [1.0] or e.conf["flip"] or e.conf.get("weighting") or e.conf.get("input_size"):
                    raise CbirError("class maps: a pooled base with multi-scale, flip, weighting or a fixed input size has no per-location form")
            elif e.name == "colour":
                if int(e.conf["grid"]) != 1:
                    raise CbirError("class maps: a colour base with a spatial grid has no per-location form")
            else:
                raise CbirError(f"class maps: base part {e.name!r} (a codebook descriptor) has no per-location form")
        self.parts = parts
        dim = int(sum(e.dim for e, _ in parts))
        if np.asarray(head["mean"]).shape[-1] != dim:
            raise CbirError(f"class maps: the head expects {np.asarray(head['mean']).shape[-1]}-d descriptors, its base gives {dim}")
        self._strides: Dict[int, Dict[str, int]] = {}
        self._torch = None

    # -- head as 1x1 convolutions ------------------------------------------------------------
    @property
    def classes(self) -> List[str]:
        return list(self.head["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.head["classes"])

    def class_name(self, i: int) -> str:
        c = self.head["classes"][i]
        return str((self.head.get("label_names") or {}).get(c, c))

    @property
    def max_side(self) -> Optional[int]:
        """Images are analysed with their longer side reduced to this (what the head was trained on)."""
        return self.base.max_side

    def _convs(self):
        import torch

        if self._torch is None:
            mean = torch.as_tensor(np.asarray(self.head["mean"], np.float32)).view(1, -1, 1, 1)
            std = torch.as_tensor(np.asarray(self.head["std"], np.float32)).view(1, -1, 1, 1)
            layers = [(torch.as_tensor(np.asarray(w, np.float32))[:, :, None, None], torch.as_tensor(np.asarray(b, np.float32)))
                      for w, b in self.head["layers"]]
            self._torch = (mean, std, layers)
        return self._torch

    def apply_head(self, desc):
        """``(B, D, h, w)`` descriptors -> ``(B, K, h, w)`` logits: standardisation + the head's layers as 1x1 convs."""
        import torch.nn.functional as F

        mean, std, layers = self._convs()
        x = (desc - mean) / std
        for i, (w, b) in enumerate(layers):
            x = F.conv2d(x, w, b)
            if i < len(layers) - 1:
                x = F.relu(x)
        return x

    # -- geometry -----------------------------------------------------------------------------
    def stage_strides(self, part) -> Dict[str, int]:
        """Stride of each stage of a pooled part's backbone, probed once on a 256x256 input."""
        import torch

        key = id(part)
        if key not in self._strides:
            with torch.inference_mode():
                maps = part.net(torch.zeros(1, 3, 256, 256))
            strides = {}
            for s in part.stages:
                h, w = maps[s].shape[-2:]
                if 256 % h or 256 % w or h != w:
                    raise CbirError(f"class maps: stage {s} of {part.conf['backbone']} has no integer stride ({h}x{w} map of 256x256)")
                strides[s] = 256 // h
            self._strides[key] = strides
        return self._strides[key]

    # -- descriptors -----------------------------------------------------------------------------
    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Shrink an RGB uint8 image to the head's analysis size (as ``semantic`` decodes it)."""
        from ..data import resize_max_side

        return resize_max_side(image, self.max_side) if self.max_side else image

    def local_descriptors(self, images: List[np.ndarray], maps: Optional[Dict[str, Any]] = None,
                          window: Any = "default", shrink_parts: bool = True) -> Tuple["torch.Tensor", float]:
        """``(B, D, gh, gw)`` base descriptors of the cells of equally sized RGB uint8 ``images``, and the stride.

        ``images`` are taken as analysed (see :meth:`prepare`); each part shrinks them to its own
        ``max_side`` as the global extractor does (``shrink_parts=False``: every part sees them as
        given). ``maps``: the feature maps of the (only) pooled part when the caller already has them
        for these images at this size. The stride is in pixels of ``images``.
        """
        descs, stride = self.descriptors_for_windows(images, [window], maps=maps, shrink_parts=shrink_parts)
        return descs[0], stride

    def descriptors_for_windows(self, images: List[np.ndarray], windows: Sequence[Any], maps: Optional[Dict[str, Any]] = None,
                                shrink_parts: bool = True) -> Tuple[List["torch.Tensor"], float]:
        """:meth:`local_descriptors` for several windows at once (the backbone and cell sums run once)."""
        import torch

        from ..data import resize_max_side
        from .batching import images_to_batches

        wins = [self.window if w == "default" else check_window(w) for w in windows]
        if not images:
            raise CbirError("class maps: no image")
        H, W = images[0].shape[:2]
        if any(im.shape[:2] != (H, W) for im in images):
            raise CbirError("class maps: images of one call must share their size")
        # 1. CNN parts: their maps and the grid at the coarsest stride
        cnn: List[Tuple[Any, Dict[str, Any]]] = []
        grids = set()
        n_cnn = sum(1 for p, _ in self.parts if p.name == "pooled")
        for e, _ in self.parts:
            if e.name != "pooled":
                continue
            ims = [resize_max_side(im, e.max_side) if e.max_side and shrink_parts else im for im in images]
            if maps is not None and n_cnn == 1:
                m = maps
            else:
                with torch.inference_mode():
                    m = e.maps(next(images_to_batches(ims))[1])
            st = self.stage_strides(e)
            coarse = max(e.stages, key=lambda s: st[s])
            grids.add((int(m[coarse].shape[-2]), int(m[coarse].shape[-1]), st[coarse], tuple(ims[0].shape[:2])))
            cnn.append((e, m))
        if len(grids) > 1:
            raise CbirError(f"class maps: the base's CNN parts give different grids {sorted(grids)}")
        if grids:
            gh, gw, S, (Hp, Wp) = grids.pop()
        else:
            S, (Hp, Wp) = COLOUR_ONLY_STRIDE, (H, W)
            gh, gw = -(-H // S), -(-W // S)
        fy = np.minimum(np.arange(gh + 1) * S, Hp) / Hp
        fx = np.minimum(np.arange(gw + 1) * S, Wp) / Wp

        # 2. per part: cell statistics once, then each window's descriptor
        per_window: List[List[Any]] = [[] for _ in wins]
        ci = 0
        with torch.inference_mode():
            for e, wgt in self.parts:
                scale = math.sqrt(wgt) if len(self.parts) > 1 else 1.0
                if e.name == "pooled":
                    e_, m = cnn[ci]
                    ci += 1
                    stats = self._pooled_cells(e_, m, S, gh, gw)
                    for i, w in enumerate(wins):
                        per_window[i].append(scale * self._pooled_window(e_, stats, w))
                else:
                    bins = [int(b) for b in e.conf["bins"]]
                    cells = []
                    for im in images:
                        ic = resize_max_side(im, e.max_side) if e.max_side and shrink_parts else im
                        cells.append(_colour_counts(ic, bins, fy, fx))
                    counts = torch.from_numpy(np.stack(cells))  # float64 counts: exact sums
                    for i, w in enumerate(wins):
                        hist = _window_sum(counts, w)
                        total = hist.sum(1, keepdim=True).clamp(min=1.0)
                        per_window[i].append(scale * _l2n(torch.sqrt(hist / total).float()))
            descs = [_l2n(torch.cat(d, 1)) if len(d) > 1 else d[0] for d in per_window]
        return descs, float(S * H / Hp)

    def _pooled_cells(self, e, maps, S: int, gh: int, gw: int):
        """Per stage: (cell sums of the pooled quantity, pixel counts), or ("max", cell maxima)."""
        import torch
        import torch.nn.functional as F

        strides = self.stage_strides(e)
        method, p = e.conf["pool"], float(e.conf["p"])
        stats = []
        for s in e.stages:
            x = maps[s]
            r = S // strides[s]
            B, C, h, w = x.shape
            hh, ww = gh * r, gw * r
            if method == "max":
                v = F.pad(x, (0, ww - w, 0, hh - h), value=-math.inf) if (hh, ww) != (h, w) else x
                stats.append(("max", v.reshape(B, C, gh, r, gw, r).amax((3, 5))))
                continue
            v = F.relu(x).clamp_(min=1e-6).pow_(p) if method == "gem" else x.clone()
            cnt = torch.ones(1, 1, h, w, dtype=v.dtype)
            if (hh, ww) != (h, w):
                v = F.pad(v, (0, ww - w, 0, hh - h))
                cnt = F.pad(cnt, (0, ww - w, 0, hh - h))
            stats.append((v.reshape(B, C, gh, r, gw, r).sum((3, 5)), cnt.reshape(1, 1, gh, r, gw, r).sum((3, 5))))
            del v
        return stats

    def _pooled_window(self, e, stats, win: Optional[int]):
        import torch

        p = float(e.conf["p"])
        parts = []
        for a, b in stats:
            if isinstance(a, str):  # max pooling
                parts.append(_l2n(_window_max(b, win)))
                continue
            mean = _window_sum(a, win) / _window_sum(b, win).clamp(min=1)
            parts.append(_l2n(mean.pow(1.0 / p) if e.conf["pool"] == "gem" else mean))
        return _l2n(torch.cat(parts, 1))

    # -- scores and maps -----------------------------------------------------------------------------
    def scores(self, image: np.ndarray, window: Any = "default", analyse: bool = True) -> Tuple[np.ndarray, float]:
        """``(K, gh, gw)`` float32 logits of one RGB uint8 image and the stride in pixels of ``image``.

        ``analyse=True`` shrinks the image to the head's ``max_side`` first, as the global extractor
        does (the stride is still given in pixels of the image passed in); ``False`` analyses it as
        given, every part at full resolution (seed 004's full-resolution map; the CNN then sees objects
        larger than in training).
        """
        import torch

        img = self.prepare(image) if analyse else image
        desc, stride = self.local_descriptors([img], window=window, shrink_parts=analyse)
        with torch.inference_mode():
            logits = self.apply_head(desc)[0]
        return logits.numpy().astype(np.float32), stride * image.shape[0] / img.shape[0]

    def class_map(self, image: np.ndarray, window: Any = "default", analyse: bool = True, chunk: int = 32,
                  prune: bool = True) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """Per-pixel ``labels`` (H, W) int64 and ``confidence`` (H, W) float32 (upsampled probability of the label).

        The coarse logits are turned into probabilities, upsampled with the bilinear transposed
        convolution (only the classes that can win, ``chunk`` at a time) and cropped to the image.
        When the image was shrunk for analysis and the stride in its own pixels is not an integer, the
        map is upsampled at the analysis size and resized (nearest label, bilinear confidence).
        Returns also ``info``: grid, stride, sizes, the global prediction.
        """
        import cv2
        import torch

        from .upsample import argmax_upsample

        H, W = image.shape[:2]
        img = self.prepare(image) if analyse else image
        Ha, Wa = img.shape[:2]
        (desc, glob), stride_a = self.descriptors_for_windows([img], [window, None], shrink_parts=analyse)
        with torch.inference_mode():
            logits = self.apply_head(desc)[0]
            g = torch.softmax(self.apply_head(glob[:, :, :1, :1])[0, :, 0, 0], 0)
        K, gh, gw = logits.shape
        S = int(round(stride_a))
        fy, fx = S * H / Ha, S * W / Wa
        direct = abs(fy - round(fy)) < 1e-9 and abs(fx - round(fx)) < 1e-9 and round(fy) == round(fx) and gh * round(fy) >= H and gw * round(fx) >= W
        if direct:
            labels, conf = argmax_upsample(logits, int(round(fy)), out_size=(H, W), chunk=chunk, prune=prune)
            labels, conf = labels.numpy(), conf.numpy().astype(np.float32)
        else:
            labels, conf = argmax_upsample(logits, S, out_size=(Ha, Wa), chunk=chunk, prune=prune)
            labels = cv2.resize(labels.numpy().astype(np.int32), (W, H), interpolation=cv2.INTER_NEAREST).astype(np.int64)
            conf = cv2.resize(conf.numpy().astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
        info = {"grid": [int(gh), int(gw)], "stride": round(float(stride_a * H / Ha), 4), "analysed_size": [int(Ha), int(Wa)],
                "size": [int(H), int(W)], "window": self.window if window == "default" else check_window(window),
                "upsampling": "direct" if direct else "analysed+resize",
                "global": {"id": int(g.argmax()), "probability": round(float(g.max()), 4)}}
        return labels, conf, info

    def global_logits(self, image: np.ndarray, analyse: bool = True) -> np.ndarray:
        """The head's output for the whole image (``window=None``): equals the ``semantic`` extractor's logits."""
        return self.scores(image, window=None, analyse=analyse)[0][:, 0, 0]

    def class_index(self, label: str) -> int:
        """Index of a class given by its label or its display name."""
        classes = self.classes
        if label in classes:
            return classes.index(label)
        names = [self.class_name(i) for i in range(len(classes))]
        if label in names:
            return names.index(label)
        raise CbirError(f"the head has no class {label!r} (classes: {classes})")


def _mapper(head_or_extractor, window) -> ClassMapper:
    if isinstance(head_or_extractor, ClassMapper):
        return head_or_extractor
    return ClassMapper(head_or_extractor, window=DEFAULT_WINDOW if window == "default" else window)


def class_scores(head_or_extractor, image: np.ndarray, window: Any = "default", analyse: bool = True) -> Tuple[np.ndarray, float]:
    """``(K, h, w)`` logits of ``image`` (RGB uint8) at every cell, and the stride in pixels of ``image``.

    ``head_or_extractor``: a head file, head dict, ``semantic`` extractor, weighted ``pooled`` extractor
    or :class:`ClassMapper` (reuse one across images: it holds the backbone). ``window``: cells per side
    of the neighbourhood each location's descriptor pools (odd; ``None``: the whole image).
    """
    return _mapper(head_or_extractor, window).scores(image, window=window, analyse=analyse)


def class_map(head_or_extractor, image: np.ndarray, window: Any = "default", analyse: bool = True, chunk: int = 32,
              prune: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Per-pixel class ids ``(H, W)`` (indices into the head's classes) and confidence ``(H, W)`` of ``image``."""
    labels, conf, _ = _mapper(head_or_extractor, window).class_map(image, window=window, analyse=analyse, chunk=chunk, prune=prune)
    return labels, conf
