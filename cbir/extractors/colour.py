"""``colour``: an HSV colour histogram (optionally on a spatial grid), square-rooted (Hellinger) and L2-normalised.

Cheap (milliseconds per image) and strong on category datasets where colour carries the class
(beaches, flowers, food); the fused default combines it with CNN descriptors.
"""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from ..vectors import l2n
from .base import EXTRACTORS, Extractor


def cell_histograms(image: np.ndarray, bins: Sequence[int], ey: Sequence[int], ex: Sequence[int]) -> np.ndarray:
    """``(gh, gw, nbins)`` float32 HSV histogram counts of the cells of an RGB uint8 ``image``.

    Cell ``(i, j)`` is rows ``ey[i]:ey[i + 1]`` and columns ``ex[j]:ex[j + 1]`` (pixel edges, ``gh = len(ey) - 1``);
    an empty cell counts nothing. Bins: ``cv2.calcHist`` over H in [0, 180), S and V in [0, 256), the flat bin
    ``(h * bins[1] + s) * bins[2] + v``. The colour extractor's grid cells and the class maps' cells
    (:mod:`cbir.extractors.classmap`) are both counted here.
    """
    import cv2

    b = [int(x) for x in bins]
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    out = np.zeros((len(ey) - 1, len(ex) - 1, b[0] * b[1] * b[2]), np.float32)
    for i in range(len(ey) - 1):
        for j in range(len(ex) - 1):
            cell = hsv[int(ey[i]) : int(ey[i + 1]), int(ex[j]) : int(ex[j + 1])]
            if cell.size:
                out[i, j] = cv2.calcHist([cell], [0, 1, 2], None, b, [0, 180, 0, 256, 0, 256]).ravel()
    return out


@EXTRACTORS.register("colour")
class ColourExtractor(Extractor):
    name = "colour"
    default_conf = {"bins": [16, 4, 4], "grid": 1, "max_side": 256}

    @property
    def dim(self) -> int:
        b = self.conf["bins"]
        return int(b[0] * b[1] * b[2] * self.conf["grid"] ** 2)

    def extract(self, images: List[np.ndarray]) -> np.ndarray:
        b = [int(x) for x in self.conf["bins"]]
        g = int(self.conf["grid"])
        out = np.zeros((len(images), self.dim), np.float32)
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            cells = cell_histograms(img, b, [k * h // g for k in range(g + 1)], [k * w // g for k in range(g + 1)])
            out[i] = np.concatenate([np.sqrt(hist / max(1.0, hist.sum())) for hist in cells.reshape(g * g, -1)])
        return l2n(out)
