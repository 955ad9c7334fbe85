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
    (``(H + 2f) x (W + 2f)`` strictly, see :func:`_upsample_padded`) plus the two
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
        up = _upsample_padded(scores[start : start + chunk], factor)
        vals, idx = up[:, factor : factor + out_h, factor : factor + out_w].max(dim=0)
        del up
        better = vals > best  # strict: earlier classes keep ties, like argmax
        best = torch.where(better, vals, best)
        labels = torch.where(better, idx + start, labels)
        del vals, idx, better
    return labels, best


def _upsample_padded(x: torch.Tensor, factor: int) -> torch.Tensor:
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
