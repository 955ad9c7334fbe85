"""Batching for network extractors: images of one size run together, resized to a network's input, in inference mode.

The threads they run with are :func:`cbir.runtime.set_threads`'s."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Dict, Iterator, List, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    import torch

import numpy as np


#: pixels per network forward: bounds the activations' memory whatever the batch size (DISK's U-Net keeps
#: 64-channel full-resolution maps: ~10 GB for 16 images of 512x384; MobileNetV2's first expanded layer is 94 MB for
#: 10 corel photos). On CPU larger batches are no faster: MobileNetV2 at 512x384 takes 12.8 ms per image in batches
#: of 2, 12.7 of 5, 13.1 of 10 (15.8 alone). 1M pixels gave default builds a peak RSS of 660-800 MiB varying run to
#: run, 500k 516-534 MiB at the same speed (500 and 2,000 corel photos, twice each).
MAX_BATCH_PIXELS = 500_000


def _uint8_batches(images: List[np.ndarray], max_pixels: int) -> Iterator[Tuple[List[int], "torch.Tensor"]]:
    """Images grouped by shape, at most ``max_pixels`` pixels per batch: (positions, uint8 (B, 3, H, W), channels-last)."""
    import torch

    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape[:2], []).append(i)
    for (h, w), idx in groups.items():
        step = max(1, int(max_pixels) // max(1, h * w))
        for a in range(0, len(idx), step):
            sub = idx[a : a + step]
            yield sub, torch.from_numpy(np.stack([images[i] for i in sub])).permute(0, 3, 1, 2)


def images_to_batches(images: List[np.ndarray], max_pixels: int = MAX_BATCH_PIXELS) -> Iterator[Tuple[List[int], "torch.Tensor"]]:
    """Group RGB uint8 images by shape; yield (positions, float tensor (B, 3, H, W) in [0, 1]).

    Images of one size (the usual case within a dataset) run together, at most ``max_pixels`` pixels per
    batch (at least one image); other sizes run in their own batches.
    """
    for sub, u8 in _uint8_batches(images, max_pixels):
        yield sub, u8.float().div_(255.0)


def scaled_batches(images: List[np.ndarray], scales: Sequence[float] = (1.0,), flip: bool = False,
                   max_pixels: int = MAX_BATCH_PIXELS) -> Iterator[Tuple[List[int], List["torch.Tensor"]]]:
    """:func:`images_to_batches` with each batch at every scale (then mirrored when ``flip``): yield (positions,
    views), each view a float (B, 3, h, w) tensor in [0, 1] (multi-scale descriptors sum the views' descriptors).

    Rescaling runs on the uint8 pixels (bilinear, antialiased when shrinking, half-pixel centres): torch's uint8
    kernel is about 10x faster than the same filter on floats and within one grey level of it."""
    import torch.nn.functional as F

    for sub, u8 in _uint8_batches(images, max_pixels):
        views = []
        for s in scales:
            b = u8 if float(s) == 1.0 else F.interpolate(u8, scale_factor=float(s), mode="bilinear", align_corners=False,
                                                          antialias=float(s) < 1)
            b = b.float().div_(255.0)
            views += [b, b.flip(-1)] if flip else [b]
        yield sub, views


def resize_to(images: List[np.ndarray], size) -> List[np.ndarray]:
    """Every image resized to ``size`` ([H, W] or one int; cv2 bilinear, as seed 003 does); ``None``: unchanged."""
    if not size:
        return images
    import cv2

    h, w = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    return [im if im.shape[:2] == (h, w) else cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR) for im in images]


@contextlib.contextmanager
def torch_inference():
    import torch

    from ..runtime import keep_freed_memory

    keep_freed_memory()  # activations reused from the heap, not mapped afresh each forward (cbir.runtime)
    with torch.inference_mode():
        yield
