"""Shared plumbing for network extractors: batching images of equal size, inference mode, threads."""

from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator, List, Tuple

import numpy as np


def images_to_batches(images: List[np.ndarray]) -> Iterator[Tuple[List[int], "torch.Tensor"]]:
    """Group RGB uint8 images by shape; yield (positions, float tensor (B, 3, H, W) in [0, 1]).

    Images of one size (the usual case within a dataset) run as one batch; others run in their own.
    """
    import torch

    groups: Dict[Tuple[int, int], List[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(im.shape[:2], []).append(i)
    for idx in groups.values():
        arr = np.stack([images[i] for i in idx])
        t = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
        yield idx, t


@contextlib.contextmanager
def torch_inference():
    import torch

    with torch.inference_mode():
        yield


def set_threads(n: int) -> None:
    """Threads for torch, OpenCV and faiss. Call before heavy work; OMP_WAIT_POLICY must be set before import."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(max(1, n))
    try:
        import cv2

        cv2.setNumThreads(max(1, n))
    except ImportError:  # pragma: no cover
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(max(1, n))
    except ImportError:  # pragma: no cover
        pass
