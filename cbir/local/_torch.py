"""Small torch helpers shared by the learned extractors and matchers (imported lazily: torch is heavy)."""

from __future__ import annotations

import numpy as np
import torch

from .base import Features


def image_tensor(image: np.ndarray, grey: bool = False, device: str = "cpu") -> torch.Tensor:
    """RGB ``uint8`` ``(H, W, 3)`` -> float ``(1, C, H, W)`` in ``[0, 1]``; ``grey`` gives one channel (ITU-R 601 luma)."""
    t = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).to(device)
    t = t.permute(2, 0, 1).float().div_(255.0)[None]
    if grey:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=t.dtype, device=t.device).view(1, 3, 1, 1)
        t = (t * w).sum(1, keepdim=True)
    return t


def features_to_torch(feats: Features, device: str = "cpu") -> dict:
    """A features dict as batched tensors: keypoints ``(1, N, 2)``, descriptors ``(1, N, D)``, scores ``(1, N)``, image_size ``(1, 2)``."""
    return {
        "keypoints": torch.from_numpy(np.asarray(feats["keypoints"], np.float32)).to(device)[None],
        "descriptors": torch.from_numpy(np.asarray(feats["descriptors"], np.float32)).to(device)[None],
        "scores": torch.from_numpy(np.asarray(feats["scores"], np.float32)).to(device)[None],
        "image_size": torch.as_tensor(np.asarray(feats["image_size"], np.float32), device=device)[None],
    }


def clamp_to_image(kpts: torch.Tensor, image_size: torch.Tensor) -> torch.Tensor:
    """Clamp ``(B, N, 2)`` keypoints into ``[0, W-1] x [0, H-1]`` (guards normalisers that reject outliers)."""
    hi = (image_size - 1).to(kpts)[:, None, :]
    return torch.minimum(torch.clamp(kpts, min=0.0), hi)
