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
  image the colour part sees), square-rooted and L2-normalised;
* ``fused``: ``concat(sqrt(w_i) part_i)``, L2-normalised, as :class:`~cbir.extractors.fused.FusedExtractor`.

The head's standardisation and linear layers then run as 1x1 convolutions: ``(K, h, w)`` logits.
Invariant (tested): with ``window=None`` (the whole image) the scores are the global head output
``head_logits(head, base.describe([image]))``; for a colour-only head every cell of a constant image
scores exactly like the whole image.

``window=1`` gives the finest but least reliable map (a 32x32 cell's colour histogram is sparse, unlike
the training images'); class maps default to ``window=3`` (96 px neighbourhoods), pooled weighting to
``window=1`` (see :data:`DEFAULT_WINDOW`; measured by ``benchmarks/fcn_weighting.py``).

Upsampling to pixels (:func:`argmax_upsample`): softmax at coarse resolution, then the classes that
cannot win anywhere are pruned exactly (a bilinear value lies between the min and max of its 2x2
cells), and the rest go through :func:`~cbir.extractors.upsample.upsample_class_scores` ``chunk``
classes at a time with a running argmax -- memory ``~H*W*(4*chunk + 40)`` bytes whatever ``K``.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import CbirError

__all__ = [
    "ClassMapper",
    "class_scores",
    "class_map",
    "argmax_upsample",
    "prune_classes",
    "upsample_memory_bytes",
    "normalise_weighting",
    "WEIGHTING_MODES",
    "DEFAULT_WINDOW",
    "WEIGHTING_WINDOW",
]

#: cells per side of the neighbourhood a location's descriptor is pooled over (None: the whole image).
#: Class maps (``cbir segment``): 3, whose cells agree with the image's label more often (corel1k test
#: split: 66% of the cells vs 48% with 1); pooled weighting: 1, the sharper map retrieves better
#: (P@10 0.844 vs 0.808). Figures in benchmarks/results/fcn_weighting.json.
DEFAULT_WINDOW = 3
WEIGHTING_WINDOW = 1
#: ``pooled`` foreground weighting modes: the weight of a location is
#: ``predicted``: the probability of the image's predicted class (global head output) there;
#: ``confidence``: the probability of the class predicted there (its own argmax);
#: ``nonbackground``: 1 - the probability of the head's background class.
WEIGHTING_MODES = ("predicted", "confidence", "nonbackground")
#: grid stride for a head whose base has no CNN part (colour only)
COLOUR_ONLY_STRIDE = 32

_MAPPERS: Dict[Tuple[str, float, Any], "ClassMapper"] = {}


# ------------------------------------------------------------------------------- memory bound


def upsample_memory_bytes(num_classes: int, height: int, width: int, chunk: Optional[int] = 32, dtype_bytes: int = 4) -> int:
    """Approximate peak bytes of upsampling ``num_classes`` score maps to ``height x width`` and taking the argmax.

    ``chunk=None``: the naive way, every class map at full size at once (plus the argmax outputs);
    otherwise :func:`~cbir.extractors.upsample.upsample_class_scores`' bound ``H*W*(4*chunk + 40)``
    (the upsampled chunk, the result maps and a few ``H x W`` temporaries). Pruning (see
    :func:`prune_classes`) only lowers the number of classes that go through.
    """
    hw = int(height) * int(width)
    if chunk is None:
        return hw * (dtype_bytes * int(num_classes) + 12)
    return hw * (dtype_bytes * min(int(chunk), int(num_classes)) + 40)


# ------------------------------------------------------------------------------- upsampling with pruning


def prune_classes(scores) -> "torch.Tensor":
    """Sorted ids of the classes that can win the bilinear argmax somewhere (exact, conservative).

    ``scores`` ``(K, h, w)``. Every upsampled pixel is ``v_c = sum_k w_k s_ck`` over a 2x2 block of the
    coarse grid framed by one ring of zeros (the transposed convolution's border), ``w_k >= 0``. The
    frame adds 0 to every class; with ``a`` the weight on the block's real cells, ``v_c <= a max_k s_ck``
    while for any set ``T`` of classes ``max_T v_d >= mean_T v_d >= a min_k mean_T s_dk``. Two sets are
    tried per block: each single class (the bound ``max_d min_k s_dk``) and the cells' own winners (the
    tight one when the block straddles two regions). A class below the bound in every block never
    wins and is dropped; ties are kept.
    """
    import torch
    import torch.nn.functional as F

    s = torch.as_tensor(scores)
    if s.dim() != 3:
        raise ValueError(f"expected (K, h, w) scores, got {tuple(s.shape)}")
    K, h, w = s.shape
    s4 = s.unsqueeze(0)
    hi = F.max_pool2d(F.pad(s4, (1, 1, 1, 1), value=-math.inf), 2, stride=1)[0]
    lo = -F.max_pool2d(F.pad(-s4, (1, 1, 1, 1), value=-math.inf), 2, stride=1)[0]
    bound = lo.max(0).values  # (h+1, w+1)
    # the cells' winners as T: the 4 cells of block (i, j) are padded cells (i..i+1, j..j+1)
    win = F.pad(s.argmax(0), (1, 1, 1, 1), value=-1)  # -1: frame
    cells = [(dy, dx) for dy in (0, 1) for dx in (0, 1)]
    ids = torch.stack([win[dy : dy + h + 1, dx : dx + w + 1] for dy, dx in cells])  # (4, h+1, w+1)
    real = ids >= 0
    uniq = real.clone()
    for j in range(1, 4):
        for i in range(j):
            uniq[j] &= ids[j] != ids[i]
    sp = F.pad(s4, (1, 1, 1, 1))[0]  # frame values are masked out below
    safe = ids.clamp(min=0)
    yy = torch.arange(h + 1).view(-1, 1)
    xx = torch.arange(w + 1).view(1, -1)
    mean_t = []
    for dy, dx in cells:  # for each cell k of the block: mean over T of s_dk
        vals = torch.stack([sp[safe[j], yy + dy, xx + dx] for j in range(4)])  # (4, h+1, w+1)
        m = (vals * uniq).sum(0) / uniq.sum(0).clamp(min=1)
        cell_real = (win[dy : dy + h + 1, dx : dx + w + 1] >= 0)
        mean_t.append(torch.where(cell_real, m, torch.full_like(m, math.inf)))
    bound = torch.maximum(bound, torch.stack(mean_t).min(0).values)
    keep = (hi >= bound).flatten(1).any(1)
    return torch.nonzero(keep).flatten()


def argmax_upsample(
    scores,
    factor: int,
    out_size: Optional[Tuple[int, int]] = None,
    chunk: int = 32,
    softmax: bool = True,
    prune: bool = True,
    border: str = "renormalise",
) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """Per-pixel class and confidence of ``(K, h, w)`` coarse scores upsampled by ``factor``.

    ``softmax``: probabilities are computed at coarse resolution and interpolated (confidence in
    [0, 1]); ``prune``: only the classes of :func:`prune_classes` are upsampled (same result); the
    upsampling itself is :func:`~cbir.extractors.upsample.upsample_class_scores` (``chunk`` classes at
    a time). The transposed convolution interpolates with zeros beyond the border, which darkens the
    outer ``factor/2`` pixels; ``border="renormalise"`` divides the confidence by the upsampled
    all-ones map there (labels are unaffected: the factor is common to all classes), ``"zero"`` keeps
    the seed's values.
    """
    import torch

    from .upsample import upsample_class_scores

    s = torch.as_tensor(scores)
    if s.dim() == 4:
        s = s[0]
    if not s.is_floating_point():
        s = s.float()
    if softmax:
        s = torch.softmax(s, dim=0)
    ids = prune_classes(s) if prune else None
    if ids is not None and len(ids) < s.shape[0]:
        labels, conf = upsample_class_scores(s[ids], factor, out_size=out_size, chunk=chunk)
        labels = ids[labels]
    else:
        labels, conf = upsample_class_scores(s, factor, out_size=out_size, chunk=chunk)
    if border == "renormalise":
        ones = torch.ones((1,) + tuple(s.shape[1:]), dtype=s.dtype)
        gain = upsample_class_scores(ones, factor, out_size=out_size, chunk=1)[1]
        conf = conf / gain.clamp(min=1e-12)
    elif border != "zero":
        raise ValueError(f"border must be 'renormalise' or 'zero', got {border!r}")
    return labels, conf


def _upsample_renormalised(x, factor: int):
    """Bilinear upsampling (transposed convolution) of ``(B, C, h, w)`` with the zero border divided out."""
    import torch

    from .upsample import upsample_bilinear

    if factor == 1:
        return x
    ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype)
    return upsample_bilinear(x, factor) / upsample_bilinear(ones, factor).clamp(min=1e-12)


# ------------------------------------------------------------------------------- colour histograms per cell


_COLOUR_LUT: Dict[Tuple[int, int, int], Tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _colour_lut(bins: Sequence[int]):
    """Per-channel bin of every 8-bit value, as ``cv2.calcHist`` (the colour extractor) bins it."""
    import cv2

    key = tuple(int(b) for b in bins)
    if key not in _COLOUR_LUT:
        luts = []
        for b, hi in zip(key, (180, 256, 256)):
            lut = np.full(256, -1, np.int64)
            for v in range(256):
                h = cv2.calcHist([np.array([[v]], np.uint8)], [0], None, [b], [0, hi]).ravel()
                if h.sum() > 0:
                    lut[v] = int(np.argmax(h))
            luts.append(lut)
        _COLOUR_LUT[key] = tuple(luts)
    return _COLOUR_LUT[key]


def _cell_index(n: int, edges: np.ndarray) -> np.ndarray:
    """Cell of each of ``n`` pixels along one axis, for cell edges ``edges`` (``edges[0]=0``, ``edges[-1]=n``)."""
    return np.searchsorted(edges[1:], np.arange(n), side="right")


def _colour_cells(img: np.ndarray, bins: Sequence[int], fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """``(nbins, gh, gw)`` HSV histogram counts per cell; ``fy``/``fx`` are cell edges as fractions of the image."""
    import cv2

    lh, ls, lv = _colour_lut(bins)
    b0, b1, b2 = (int(b) for b in bins)
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    H, W = hsv.shape[:2]
    binidx = (lh[hsv[..., 0]] * b1 + ls[hsv[..., 1]]) * b2 + lv[hsv[..., 2]]
    valid = (lh[hsv[..., 0]] >= 0) & (ls[hsv[..., 1]] >= 0) & (lv[hsv[..., 2]] >= 0)
    ey = np.round(fy * H).astype(np.int64)
    ex = np.round(fx * W).astype(np.int64)
    gh, gw = len(fy) - 1, len(fx) - 1
    cell = _cell_index(H, ey)[:, None] * gw + _cell_index(W, ex)[None, :]
    nb = b0 * b1 * b2
    flat = (cell * nb + binidx)[valid]
    counts = np.bincount(flat.ravel(), minlength=gh * gw * nb).reshape(gh, gw, nb)
    return counts.transpose(2, 0, 1).astype(np.float64)


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


def _check_window(window) -> Optional[int]:
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
        self.window = _check_window(window)
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
    def _stage_strides(self, part) -> Dict[str, int]:
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

        wins = [self.window if w == "default" else _check_window(w) for w in windows]
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
            st = self._stage_strides(e)
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
                        cells.append(_colour_cells(ic, bins, fy, fx))
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

        strides = self._stage_strides(e)
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
                "size": [int(H), int(W)], "window": self.window if window == "default" else _check_window(window),
                "upsampling": "direct" if direct else "analysed+resize",
                "global": {"id": int(g.argmax()), "probability": round(float(g.max()), 4)}}
        return labels, conf, info

    def global_logits(self, image: np.ndarray, analyse: bool = True) -> np.ndarray:
        """The head's output for the whole image (``window=None``): equals the ``semantic`` extractor's logits."""
        return self.scores(image, window=None, analyse=analyse)[0][:, 0, 0]

    # -- foreground weights for pooled ------------------------------------------------------------------
    def weight_maps(self, batch, spec: Dict[str, Any], sizes: Dict[str, Tuple[int, int]],
                    maps: Optional[Dict[str, Any]] = None, strides: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
        """``{stage: (B, 1, h, w)}`` location weights for a float batch ``(B, 3, H, W)`` in [0, 1].

        ``spec``: a normalised weighting (:func:`normalise_weighting`). With ``maps`` and ``strides``
        (the caller's backbone is the head's: same maps), the coarse weights are upsampled exactly onto
        each stage's grid; otherwise they are upsampled to the image and resized to each stage.
        """
        import torch
        import torch.nn.functional as F

        images = [np.ascontiguousarray(t) for t in (batch * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()]
        win = _check_window(spec.get("window", WEIGHTING_WINDOW))
        mode = spec["mode"]
        (desc, glob), stride = self.descriptors_for_windows(images, [win, None], maps=maps)
        with torch.inference_mode():
            prob = torch.softmax(self.apply_head(desc), dim=1)
            if mode == "predicted":
                cls = self.apply_head(glob[:, :, :1, :1]).argmax(1).view(-1)
                wmap = prob[torch.arange(len(images)), cls].unsqueeze(1)
            elif mode == "confidence":
                wmap = prob.amax(1, keepdim=True)
            elif mode == "nonbackground":
                wmap = 1.0 - prob[:, self.class_index(spec["background"])].unsqueeze(1)
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
                    out[s] = _upsample_renormalised(wmap, r)[..., :h, :w]
            else:
                H, W = images[0].shape[:2]
                Hp, Wp = round(H * S / stride), round(W * S / stride)  # the size the head's CNN saw
                full = _upsample_renormalised(wmap, S)[..., :Hp, :Wp]
                if (Hp, Wp) != (H, W):
                    full = F.interpolate(full, size=(H, W), mode="bilinear", align_corners=False)
                for s, (h, w) in sizes.items():
                    out[s] = F.interpolate(full, size=(h, w), mode="area") if (h, w) != (H, W) else full
        return out

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


# ------------------------------------------------------------------------------- pooled weighting option


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
    out = {"mode": mode, "window": _check_window(spec.get("window", WEIGHTING_WINDOW))}
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
    return mapper._stage_strides(e)


def mapper_for(head: str, window: Optional[int]) -> ClassMapper:
    """A cached mapper per (head file, its mtime, window): extraction reuses the loaded backbone."""
    key = (head, os.path.getmtime(head), window)
    if key not in _MAPPERS:
        _MAPPERS.clear()
        _MAPPERS[key] = ClassMapper(head, window=window)
    return _MAPPERS[key]
