"""``superpoint`` local features: the Magic Leap network of :mod:`cbir.models.superpoint` on the grey image.

The weights (``superpoint_v1.pth``, non-commercial) are not shipped: pass ``weights=PATH`` or put the file in
``$CBIR_WEIGHTS``. Configuration as in SuperGlue's demo / seed 001: ``max_keypoints``, ``keypoint_threshold``,
``nms_radius``, ``remove_borders``.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from .base import EXTRACTORS, KeypointExtractor, Features, make_features


@EXTRACTORS.register("superpoint")
class SuperPointFeatures(KeypointExtractor):
    """SuperPoint keypoints and 256-D descriptors."""

    name = "superpoint"
    descriptor_dim = 256
    weights_file = "superpoint_v1.pth"
    default_conf: Dict[str, Any] = {
        "max_keypoints": 2048,
        "keypoint_threshold": 0.005,
        "nms_radius": 4,
        "remove_borders": 4,
    }

    def __init__(self, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(weights, device, **conf)
        from ..models.superpoint import load_superpoint
        from ..weights import resolve_weights

        path = resolve_weights(self.weights_file, weights)
        self.net = load_superpoint(path, dict(self.conf)).to(device)
        self.weights_path = str(path)

    def _extract(self, image: np.ndarray) -> Features:
        import torch

        from ._torch import image_tensor

        h, w = image.shape[:2]
        with torch.inference_mode():
            kpts, scores, desc = self.net(image_tensor(image, grey=True, device=self.device))
        return make_features(kpts[0], desc[0], scores[0], (w, h))
