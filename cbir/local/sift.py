"""SIFT and RootSIFT from OpenCV (no weights).

Descriptors are returned L2-normalised (RootSIFT: L1-normalised, square-rooted, hence unit L2 norm too), so
every cbir feature can be compared with the same distances. Scores are OpenCV's detector responses.
"""

from __future__ import annotations

from typing import Any, Dict

import cv2
import numpy as np

from ..vectors import l2n
from .base import EXTRACTORS, KeypointExtractor, Features, make_features


@EXTRACTORS.register("sift")
class SIFT(KeypointExtractor):
    """OpenCV SIFT on the grey image; ``max_keypoints`` strongest responses (<= 0: all)."""

    name = "sift"
    descriptor_dim = 128
    default_conf: Dict[str, Any] = {
        "max_keypoints": 4096,
        "contrast_threshold": 0.04,
        "edge_threshold": 10.0,
        "n_octave_layers": 3,
        "sigma": 1.6,
    }

    def __init__(self, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(weights, device, **conf)
        c = self.conf
        self._sift = cv2.SIFT_create(
            nfeatures=max(0, int(c["max_keypoints"])),
            nOctaveLayers=int(c["n_octave_layers"]),
            contrastThreshold=float(c["contrast_threshold"]),
            edgeThreshold=float(c["edge_threshold"]),
            sigma=float(c["sigma"]),
        )

    def _extract(self, image: np.ndarray) -> Features:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        kps, desc = self._sift.detectAndCompute(grey, None)
        h, w = grey.shape
        if not kps or desc is None:
            return make_features(np.zeros((0, 2)), np.zeros((0, 128)), np.zeros(0), (w, h))
        xy = np.array([k.pt for k in kps], np.float32)
        resp = np.array([k.response for k in kps], np.float32)
        order = np.argsort(-resp, kind="stable")
        limit = int(self.conf["max_keypoints"])
        if limit > 0:
            order = order[:limit]  # OpenCV may return a few more than nfeatures (ties, orientations)
        desc = desc[order].astype(np.float32)
        desc = self._normalise(desc)
        return make_features(xy[order], desc, resp[order], (w, h))

    def _normalise(self, desc: np.ndarray) -> np.ndarray:
        return l2n(desc)


@EXTRACTORS.register("rootsift")
class RootSIFT(SIFT):
    """RootSIFT (Arandjelovic & Zisserman 2012): Hellinger kernel on SIFT, i.e. sqrt of the L1-normalised descriptor."""

    name = "rootsift"

    def _normalise(self, desc: np.ndarray) -> np.ndarray:
        desc = desc / np.maximum(np.abs(desc).sum(axis=1, keepdims=True), 1e-12)
        return np.sqrt(desc)
