"""Bilinear upsampling as a (learnable) transposed convolution, FCN-32s style.

A transposed convolution with stride ``f`` whose kernel is the separable "tent"
``(1 - |i - c| / f) * (1 - |j - c| / f)`` of size ``k = 2f - f % 2`` performs
bilinear interpolation; used as a layer it can be initialised to bilinear and
then trained (Long et al., *Fully convolutional networks for semantic
segmentation*).

Padding rule (why the output equals ``skimage.transform.rescale`` exactly)
---------------------------------------------------------------------------
With ``padding=p`` output pixel ``o`` takes input pixel ``i`` with weight
``1 - |o + p - i*f - c| / f`` where ``c`` is the kernel centre (``f - 1`` for odd
``f``, ``f - 0.5`` for even ``f``). skimage (``order=1``) samples the input at
the pixel-centre coordinate ``x = (o + 0.5) / f - 0.5``, i.e. weight
``1 - |x - i| = 1 - |o + 0.5 - f/2 - i*f| / f``. Equating gives
``p = c + 0.5 - f/2 = f // 2`` for both parities, and then the output length is
``(H - 1)*f + k - 2p = H*f`` exactly, so ``output_padding = 0``.

The remaining conditions for ``np.allclose`` with
``rescale(img, f, order=1, mode='constant', cval=0, channel_axis=-1)``:

* ``mode='constant'`` is translated by skimage to scipy's ``'grid-constant'``:
  zeros beyond the border *are* interpolated with, which is exactly the implicit
  zero padding of the transposed convolution (``torch.nn.functional.interpolate``
  with ``align_corners=False`` differs: it clamps to the edge pixel).
* ``channel_axis=-1`` for H x W x C arrays, otherwise the channel axis is rescaled
  too. ``anti_aliasing`` defaults to ``None`` which resolves to ``False`` when
  upsampling; passing ``False`` explicitly changes nothing.
* ``clip=True`` (the default) clips to ``[img.min(), img.max()]``. Every output is
  a convex combination of input pixels and the zero border, so the clip is a
  no-op when ``img.min() <= 0 <= img.max()`` (e.g. the seed's ramp starting at 0,
  logits); for a strictly positive image pass ``clip=False`` or the darkened
  border pixels get clipped up.

Class maps (:func:`argmax_upsample`, used by :mod:`cbir.extractors.classmap`)
------------------------------------------------------------------------------
Softmax at coarse resolution, then the classes that cannot win anywhere are
pruned exactly (:func:`prune_classes`: a bilinear value lies between the min and
max of its 2x2 cells), and the rest go through :func:`upsample_class_scores`
``chunk`` classes at a time with a running argmax -- memory
``~H*W*(4*chunk + 40)`` bytes whatever ``K`` (:func:`upsample_memory_bytes`).
:func:`upsample_renormalised` divides the zero border out of a weight map.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "bilinear_kernel_size",
    "upsample_filt",
    "bilinear_weights",
    "BilinearUpsample",
    "upsample_bilinear",
    "upsample_class_scores",
    "upsample_padded",
    "upsample_memory_bytes",
    "prune_classes",
    "argmax_upsample",
    "upsample_renormalised",
]


def _check_factor(factor: int) -> int:
    if isinstance(factor, bool) or int(factor) != factor or factor < 1:
        raise ValueError(f"upsampling factor must be a positive integer, got {factor!r}")
    return int(factor)


def bilinear_kernel_size(factor: int) -> int:
    """Kernel size of the bilinear transposed convolution: ``2f - f % 2``."""
    factor = _check_factor(factor)
    return 2 * factor - factor % 2


def upsample_filt(size: int) -> np.ndarray:
    """2-D bilinear (tent) kernel of shape ``(size, size)``, float64.

    ``f = (size + 1) // 2``; centre ``f - 1`` (odd size) or ``f - 0.5`` (even size);
    value ``(1 - |r - centre| / f) * (1 - |c - centre| / f)``.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"kernel size must be a positive integer, got {size!r}")
    size = int(size)
    f = (size + 1) // 2
    centre = f - 1 if size % 2 == 1 else f - 0.5
    tent = 1.0 - np.abs(np.arange(size, dtype=np.float64) - centre) / f
    return np.outer(tent, tent)


def bilinear_weights(factor: int, channels: int) -> np.ndarray:
    """Full ``(C, C, k, k)`` float32 weight in ``ConvTranspose2d`` layout ``(in, out, kH, kW)``.

    The tent kernel sits on the diagonal ``[i, i]`` only, so channels are not
    mixed (this is the seed's ``bilinear_upsample_weights``, transposed from TF's
    ``(kH, kW, out, in)`` layout).
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    k = bilinear_kernel_size(factor)
    weights = np.zeros((channels, channels, k, k), dtype=np.float32)
    idx = np.arange(channels)
    weights[idx, idx] = upsample_filt(k)
    return weights


def _depthwise_weight(
    factor: int, channels: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """``(C, 1, k, k)`` weight for ``groups=C``: the same diagonal, without the zeros."""
    kernel = torch.as_tensor(upsample_filt(bilinear_kernel_size(factor)), dtype=dtype, device=device)
    return kernel.expand(channels, 1, *kernel.shape).contiguous()


class BilinearUpsample(nn.Module):
    """Transposed convolution initialised to bilinear upsampling by an integer ``factor``.

    ``forward`` maps ``(N, C, H, W)`` (or ``(C, H, W)``) to exactly ``factor*H x factor*W``
    (``padding = factor // 2``, see the module docstring) and matches
    ``skimage.transform.rescale(order=1, mode='constant', cval=0)``.

    ``depthwise=True`` (default) uses ``groups=C`` and a ``(C, 1, k, k)`` weight:
    the same output as the seed's full ``(C, C, k, k)`` diagonal weight
    (``depthwise=False``) with ``C`` times fewer parameters and FLOPs. Note that
    training the full variant may learn cross-channel terms, the depthwise one
    cannot. ``learnable=False`` freezes the weight (``requires_grad=False``).
    """

    def __init__(
        self,
        channels: int,
        factor: int,
        *,
        learnable: bool = True,
        depthwise: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.factor = _check_factor(factor)
        self.channels = int(channels)
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        self.depthwise = bool(depthwise)
        self.kernel_size = bilinear_kernel_size(self.factor)
        self.padding = self.factor // 2
        self.conv = nn.ConvTranspose2d(
            self.channels,
            self.channels,
            self.kernel_size,
            stride=self.factor,
            padding=self.padding,
            output_padding=0,
            groups=self.channels if self.depthwise else 1,
            bias=False,
            dtype=dtype,
        )
        self.reset_parameters()
        self.conv.weight.requires_grad_(bool(learnable))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise the weight to the bilinear kernel."""
        weight = self.conv.weight
        kernels = _depthwise_weight(self.factor, self.channels, dtype=weight.dtype, device=weight.device)
        if self.depthwise:
            weight.copy_(kernels)
        else:  # bilinear_weights(), built in the parameter's own dtype
            weight.zero_()
            idx = torch.arange(self.channels, device=weight.device)
            weight[idx, idx] = kernels[:, 0]

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.channels:
            raise ValueError(
                f"expected (N, {self.channels}, H, W) or ({self.channels}, H, W), got {tuple(x.shape)}"
            )
        return self.conv(x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}, depthwise={self.depthwise}"


def upsample_bilinear(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Functional, non-learnable bilinear upsampling of ``(N, C, H, W)`` or ``(C, H, W)``.

    Same result as :class:`BilinearUpsample` (depthwise transposed convolution,
    zero border, output ``factor*H x factor*W``); keeps ``x``'s dtype and device.
    """
    factor = _check_factor(factor)
    if x.dim() not in (3, 4):
        raise ValueError(f"expected (N, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    channels = x.shape[-3]
    if factor == 1:
        return x.clone()
    weight = _depthwise_weight(factor, channels, dtype=x.dtype, device=x.device)
    return F.conv_transpose2d(x, weight, stride=factor, padding=factor // 2, groups=channels)


@torch.no_grad()
def upsample_class_scores(
    scores: torch.Tensor,
    factor: int,
    out_size: tuple[int, int] | None = None,
    chunk: int = 32,
    softmax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel argmax of bilinearly upsampled class maps, with bounded memory.

    ``scores`` is ``(1, K, h, w)`` or ``(K, h, w)`` coarse class scores. Classes are
    upsampled ``chunk`` channels at a time while a running maximum and argmax are
    kept, so all ``K`` full-size maps never coexist. Returns ``(labels, confidence)``
    of shape ``(H, W)``: int64 class ids and the upsampled score of the winning
    class (its upsampled *probability* if ``softmax=True``, where the softmax over
    classes is taken at coarse resolution first). Ties go to the lowest class id,
    as with ``torch.argmax``.

    ``out_size=(H, W)`` crops to the original image size (which need not be a
    multiple of ``factor``; it must be ``<= (factor*h, factor*w)``); only the
    ``ceil(H / factor) + 1`` coarse rows (and likewise columns) that reach the crop
    are upsampled, which gives exactly the crop of the full upsampling.

    Peak memory, 4-byte scores: about ``chunk*H*W*4`` bytes for the upsampled chunk
    (``(H + 2f) x (W + 2f)`` strictly, see :func:`upsample_padded`) plus the two
    ``H x W`` result maps (float32 + int64, 12 bytes/pixel) and a few ``H x W``
    temporaries of the same size (chunk max/argmax, mask), i.e. roughly
    ``H*W*(4*chunk + 40)`` bytes: ~0.66 GiB for K=1000 at 2048x2048 with
    ``chunk=32``, against 16 GiB for upsampling all classes at once. (CPU
    ``conv_transpose2d`` would add a column buffer about as large as its output,
    hence the interpolate-based chunk upsampling.)
    """
    factor = _check_factor(factor)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if scores.dim() == 4:
        if scores.shape[0] != 1:
            raise ValueError(f"expected a batch of one, got {tuple(scores.shape)}")
        scores = scores[0]
    if scores.dim() != 3:
        raise ValueError(f"expected (1, K, h, w) or (K, h, w), got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        scores = scores.float()
    num_classes, h, w = scores.shape
    if num_classes < 1 or h < 1 or w < 1:
        raise ValueError(f"empty score map {tuple(scores.shape)}")

    full_h, full_w = h * factor, w * factor
    if out_size is None:
        out_h, out_w = full_h, full_w
    else:
        out_h, out_w = (int(s) for s in out_size)
        if not (0 < out_h <= full_h and 0 < out_w <= full_w):
            raise ValueError(f"out_size {tuple(out_size)} must lie within the upsampled size {(full_h, full_w)}")

    if softmax:
        scores = torch.softmax(scores, dim=0)
    # Output row o only reads coarse rows i < (o + 0.5) / f + 0.5, so rows beyond
    # ceil(out_h / f) + 1 never reach the crop and can be dropped before upsampling.
    scores = scores[:, : min(h, math.ceil(out_h / factor) + 1), : min(w, math.ceil(out_w / factor) + 1)]

    best = torch.full((out_h, out_w), -math.inf, dtype=scores.dtype, device=scores.device)
    labels = torch.zeros((out_h, out_w), dtype=torch.int64, device=scores.device)
    for start in range(0, num_classes, chunk):
        up = upsample_padded(scores[start : start + chunk], factor)
        vals, idx = up[:, factor : factor + out_h, factor : factor + out_w].max(dim=0)
        del up
        better = vals > best  # strict: earlier classes keep ties, like argmax
        best = torch.where(better, vals, best)
        labels = torch.where(better, idx + start, labels)
        del vals, idx, better
    return labels, best


def upsample_padded(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Same maps as :func:`upsample_bilinear` of ``(C, h, w)``, with a ``factor``-pixel frame.

    One zero row/column is added on every side and ``F.interpolate(bilinear,
    align_corners=False)`` (pixel-centre sampling, edge-clamped) upsamples it; the
    clamping only touches the outer ``factor // 2`` pixels of the frame, so
    ``result[:, f:-f, f:-f]`` equals the transposed convolution with its zero
    border. Used by :func:`upsample_class_scores` because, unlike CPU
    ``conv_transpose2d``, it needs no column buffer as large as its output and is
    faster.
    """
    padded = F.pad(x, (1, 1, 1, 1)).unsqueeze(0)
    size = (padded.shape[-2] * factor, padded.shape[-1] * factor)
    return F.interpolate(padded, size=size, mode="bilinear", align_corners=False)[0]


# ------------------------------------------------------------------------------- class maps: pruning, argmax, borders


def upsample_memory_bytes(num_classes: int, height: int, width: int, chunk: int | None = 32, dtype_bytes: int = 4) -> int:
    """Approximate peak bytes of upsampling ``num_classes`` score maps to ``height x width`` and taking the argmax.

    ``chunk=None``: the naive way, every class map at full size at once (plus the argmax outputs);
    otherwise :func:`upsample_class_scores`' bound ``H*W*(4*chunk + 40)``
    (the upsampled chunk, the result maps and a few ``H x W`` temporaries). Pruning (see
    :func:`prune_classes`) only lowers the number of classes that go through.
    """
    hw = int(height) * int(width)
    if chunk is None:
        return hw * (dtype_bytes * int(num_classes) + 12)
    return hw * (dtype_bytes * min(int(chunk), int(num_classes)) + 40)


def prune_classes(scores) -> torch.Tensor:
    """Sorted ids of the classes that can win the bilinear argmax somewhere (exact, conservative).

    ``scores`` ``(K, h, w)``. Every upsampled pixel is ``v_c = sum_k w_k s_ck`` over a 2x2 block of the
    coarse grid framed by one ring of zeros (the transposed convolution's border), ``w_k >= 0``. The
    frame adds 0 to every class; with ``a`` the weight on the block's real cells, ``v_c <= a max_k s_ck``
    while for any set ``T`` of classes ``max_T v_d >= mean_T v_d >= a min_k mean_T s_dk``. Two sets are
    tried per block: each single class (the bound ``max_d min_k s_dk``) and the cells' own winners (the
    tight one when the block straddles two regions). A class below the bound in every block never
    wins and is dropped; ties are kept.
    """
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
    out_size: tuple[int, int] | None = None,
    chunk: int = 32,
    softmax: bool = True,
    prune: bool = True,
    border: str = "renormalise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel class and confidence of ``(K, h, w)`` coarse scores upsampled by ``factor``.

    ``softmax``: probabilities are computed at coarse resolution and interpolated (confidence in
    [0, 1]); ``prune``: only the classes of :func:`prune_classes` are upsampled (same result); the
    upsampling itself is :func:`upsample_class_scores` (``chunk`` classes at
    a time). The transposed convolution interpolates with zeros beyond the border, which darkens the
    outer ``factor/2`` pixels; ``border="renormalise"`` divides the confidence by the upsampled
    all-ones map there (labels are unaffected: the factor is common to all classes), ``"zero"`` keeps
    the seed's values.
    """
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


def upsample_renormalised(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear upsampling (transposed convolution) of ``(B, C, h, w)`` with the zero border divided out."""
    if factor == 1:
        return x
    ones = torch.ones((1, 1) + tuple(x.shape[-2:]), dtype=x.dtype)
    return upsample_bilinear(x, factor) / upsample_bilinear(ones, factor).clamp(min=1e-12)
