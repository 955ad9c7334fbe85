"""SuperPoint (DeTone, Malisiewicz & Rabinovich, CVPRW 2018): the Magic Leap network, written from its published structure.

The parameter names follow the official ``superpoint_v1.pth`` (``conv1a`` ... ``conv4b``, ``convPa``, ``convPb``,
``convDa``, ``convDb``), so that file loads strictly. Magic Leap's weights are for non-commercial research only
and are not shipped: load them from a user path (see :func:`load_superpoint`).

The forward pass takes and returns tensors only (no dicts), as the ONNX export of seed 001 needs:
``keypoints (1, N, 2)`` ``(x, y)`` pixels, ``scores (1, N)``, ``descriptors (1, N, 256)``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CONF: Dict[str, Any] = {
    "descriptor_dim": 256,
    "nms_radius": 4,
    "keypoint_threshold": 0.005,
    "max_keypoints": -1,  # -1: keep all
    "remove_borders": 4,
}

#: file name looked up in $CBIR_WEIGHTS when no path is given
WEIGHTS_FILE = "superpoint_v1.pth"


def max_pool_nms(scores: torch.Tensor, radius: int) -> torch.Tensor:
    """Keep the scores that are maxima of their ``(2r+1)^2`` window; two extra rounds recover maxima hidden by a
    suppressed neighbour (SuperPoint's "simple NMS"). ``scores``: ``(B, H, W)``."""
    if radius <= 0:
        return scores
    k = 2 * radius + 1

    def pool(x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x[:, None], kernel_size=k, stride=1, padding=radius)[:, 0]

    zeros = torch.zeros_like(scores)
    keep = scores == pool(scores)
    for _ in range(2):
        suppressed = pool(keep.float()) > 0
        rest = torch.where(suppressed, zeros, scores)
        new_max = rest == pool(rest)
        keep = keep | (new_max & ~suppressed)
    return torch.where(keep, scores, zeros)


def sample_descriptors(keypoints: torch.Tensor, dense: torch.Tensor, cell: int = 8) -> torch.Tensor:
    """Bilinearly read ``dense`` ``(B, D, h, w)`` (stride ``cell``) at ``(B, N, 2)`` pixel keypoints -> ``(B, N, D)``, L2-normalised.

    Keypoint ``p`` is mapped to ``(p - cell/2 + 0.5) / (size*cell - cell/2 - 0.5)`` in ``[0, 1]`` (the mapping the
    official weights were trained with) and sampled with ``align_corners=True``.
    """
    b, d, h, w = dense.shape
    denom = torch.tensor([w * cell - cell / 2 - 0.5, h * cell - cell / 2 - 0.5], dtype=keypoints.dtype, device=keypoints.device)
    grid = (keypoints - cell / 2 + 0.5) / denom * 2 - 1
    desc = F.grid_sample(dense, grid.view(b, 1, -1, 2).to(dense.dtype), mode="bilinear", align_corners=True)
    return F.normalize(desc.reshape(b, d, -1), p=2, dim=1).transpose(1, 2)


class SuperPoint(nn.Module):
    """SuperPoint: shared VGG-style encoder, a 65-way keypoint head and a 256-D descriptor head.

    ``forward(image)`` takes a grey ``(1, 1, H, W)`` image in ``[0, 1]`` and returns
    ``(keypoints (1, N, 2), scores (1, N), descriptors (1, N, D))``; use :meth:`detect` for a batch.
    """

    def __init__(self, conf: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.conf = {**DEFAULT_CONF, **(conf or {})}
        c1, c2, c3, c4, c5 = 64, 64, 128, 128, 256
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.conv1a = nn.Conv2d(1, c1, 3, padding=1)
        self.conv1b = nn.Conv2d(c1, c1, 3, padding=1)
        self.conv2a = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv2b = nn.Conv2d(c2, c2, 3, padding=1)
        self.conv3a = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv3b = nn.Conv2d(c3, c3, 3, padding=1)
        self.conv4a = nn.Conv2d(c3, c4, 3, padding=1)
        self.conv4b = nn.Conv2d(c4, c4, 3, padding=1)
        self.convPa = nn.Conv2d(c4, c5, 3, padding=1)
        self.convPb = nn.Conv2d(c5, 65, 1)
        self.convDa = nn.Conv2d(c4, c5, 3, padding=1)
        self.convDb = nn.Conv2d(c5, int(self.conf["descriptor_dim"]), 1)

    def dense(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full-resolution keypoint probability ``(B, H', W')`` (H', W' = floor to multiples of 8) and the
        coarse L2-normalised descriptor map ``(B, D, H'/8, W'/8)``."""
        x = self.relu(self.conv1a(image))
        x = self.pool(self.relu(self.conv1b(x)))
        x = self.relu(self.conv2a(x))
        x = self.pool(self.relu(self.conv2b(x)))
        x = self.relu(self.conv3a(x))
        x = self.pool(self.relu(self.conv3b(x)))
        x = self.relu(self.conv4a(x))
        x = self.relu(self.conv4b(x))
        prob = F.softmax(self.convPb(self.relu(self.convPa(x))), dim=1)[:, :-1]
        b, _, h, w = prob.shape
        # channel (dy * 8 + dx) of cell (i, j) is pixel (8i + dy, 8j + dx)
        prob = prob.permute(0, 2, 3, 1).reshape(b, h, w, 8, 8).permute(0, 1, 3, 2, 4).reshape(b, h * 8, w * 8)
        desc = F.normalize(self.convDb(self.relu(self.convDa(x))), p=2, dim=1)
        return prob, desc

    def _select(self, prob: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keypoints ``(N, 2)`` (x, y) and scores ``(N,)`` of one NMS-ed probability map ``(H, W)``."""
        h, w = prob.shape
        th = float(self.conf["keypoint_threshold"])
        ys, xs = torch.where(prob > th)
        scores = prob[ys, xs]
        border = int(self.conf["remove_borders"])
        if border > 0:
            keep = (ys >= border) & (ys < h - border) & (xs >= border) & (xs < w - border)
            ys, xs, scores = ys[keep], xs[keep], scores[keep]
        k = int(self.conf["max_keypoints"])
        if k >= 0 and scores.shape[0] > k:
            scores, idx = torch.topk(scores, k)
            ys, xs = ys[idx], xs[idx]
        else:
            scores, idx = torch.sort(scores, descending=True)
            ys, xs = ys[idx], xs[idx]
        return torch.stack([xs, ys], dim=-1).to(prob.dtype), scores

    def detect(self, image: torch.Tensor):
        """Batched detection: lists (one entry per image) of keypoints ``(N, 2)``, scores ``(N,)``, descriptors ``(N, D)``."""
        prob, dense = self.dense(image)
        prob = max_pool_nms(prob, int(self.conf["nms_radius"]))
        kpts, scores, descs = [], [], []
        for i in range(prob.shape[0]):
            k, s = self._select(prob[i])
            kpts.append(k)
            scores.append(s)
            descs.append(sample_descriptors(k[None], dense[i : i + 1], 8)[0])
        return kpts, scores, descs

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tensor-only forward of one image ``(1, 1, H, W)``: ``keypoints (1, N, 2)``, ``scores (1, N)``, ``descriptors (1, N, D)``."""
        kpts, scores, descs = self.detect(image[:1])
        return kpts[0][None], scores[0][None], descs[0][None]


def load_superpoint(path: Optional[os.PathLike] = None, conf: Optional[Dict[str, Any]] = None) -> SuperPoint:
    """SuperPoint with weights from ``path`` (else ``$CBIR_WEIGHTS/superpoint_v1.pth``), loaded strictly, in eval mode."""
    from ..weights import load_into, load_state_dict, resolve_weights

    p = resolve_weights(WEIGHTS_FILE, path)
    net = SuperPoint(conf)
    load_into(net, load_state_dict(p), p)
    return net.eval()
