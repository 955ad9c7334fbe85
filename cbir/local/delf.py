"""DELF (Noh et al. 2017) from a TF-Hub module, and the seed-000 matching recipe.

The recipe of seed 000 (KD-tree nearest neighbours within L2 distance 0.8 from image 1 into image 0, then an
affine RANSAC with 3 samples, 20 px residual, 1000 trials) works for any attention-scored, L2-normalised local
descriptors: it is :data:`DELF_RECIPE`, usable with every extractor (``matcher='kdtree', model='affine'``).

The DELF network itself is optional: it needs ``tensorflow`` and ``tensorflow_hub`` (not dependencies of cbir)
and a TF-Hub ``google/delf/1`` module saved on disk, since cbir never downloads weights. Pass the module folder as
``weights=`` or put it in ``$CBIR_WEIGHTS/delf``. Without them, constructing the extractor raises a
:class:`~cbir.errors.CbirError` that says what to install and where to put the module.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import CbirError, WeightsNotFound
from .base import EXTRACTORS, KeypointExtractor, Features, make_features

#: seed 000's matching and verification parameters
DELF_RECIPE: Dict[str, Any] = {
    "matcher": "kdtree",
    "matcher_conf": {"distance_upper_bound": 0.8},
    "model": "affine",
    "verify_conf": {"min_samples": 3, "residual_threshold": 20.0, "max_trials": 1000},
}

MODULE_DIR = "delf"


def tensorflow_available() -> bool:
    """True when both ``tensorflow`` and ``tensorflow_hub`` can be imported."""
    try:
        return importlib.util.find_spec("tensorflow") is not None and importlib.util.find_spec("tensorflow_hub") is not None
    except (ImportError, ValueError):
        return False


def resolve_module(explicit: Optional[os.PathLike] = None) -> Path:
    """The TF-Hub DELF module folder: ``explicit``, else ``$CBIR_WEIGHTS/delf``."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_dir():
            raise WeightsNotFound(f"{p}: DELF TF-Hub module folder not found (expected a SavedModel folder)")
        return p
    folder = os.environ.get("CBIR_WEIGHTS")
    if folder and (Path(folder) / MODULE_DIR).is_dir():
        return Path(folder) / MODULE_DIR
    raise WeightsNotFound(
        "DELF TF-Hub module not found: save google/delf/1 as a SavedModel folder and pass it with --weights, or put it"
        f" in $CBIR_WEIGHTS/{MODULE_DIR} ({folder or 'CBIR_WEIGHTS unset'}). cbir never downloads weights."
    )


@EXTRACTORS.register("delf")
class DELF(KeypointExtractor):
    """DELF keypoints (attention-selected, multi-scale) with 40-D PCA-whitened, L2-normalised descriptors."""

    name = "delf"
    descriptor_dim = 40
    default_conf: Dict[str, Any] = {
        "score_threshold": 100.0,
        "image_scales": [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0],
        "max_keypoints": 1000,
    }

    def __init__(self, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(weights, device, **conf)
        if not tensorflow_available():
            raise CbirError(
                "features 'delf' need tensorflow and tensorflow_hub, which are not installed. Install them"
                " (pip install tensorflow tensorflow-hub) and pass a saved google/delf/1 module with --weights; or use"
                " the DELF matching recipe with installed features: --matcher kdtree --model affine (e.g. --features aliked)."
            )
        import tensorflow as tf  # noqa: F401  (optional dependency)
        import tensorflow_hub as hub

        path = resolve_module(weights)
        self._tf = tf
        self._delf = hub.load(str(path)).signatures["default"]
        self.weights_path = str(path)

    def _extract(self, image: np.ndarray) -> Features:  # pragma: no cover - needs tensorflow
        tf = self._tf
        h, w = image.shape[:2]
        out = self._delf(
            image=tf.image.convert_image_dtype(image, tf.float32),
            score_threshold=tf.constant(float(self.conf["score_threshold"])),
            image_scales=tf.constant([float(s) for s in self.conf["image_scales"]]),
            max_feature_num=tf.constant(int(self.conf["max_keypoints"])),
        )
        yx = np.asarray(out["locations"], np.float32).reshape(-1, 2)
        desc = np.asarray(out["descriptors"], np.float32).reshape(yx.shape[0], -1)
        scores = np.asarray(out["scores"], np.float32).reshape(-1) if "scores" in out else np.ones(len(yx), np.float32)
        return make_features(yx[:, ::-1], desc, scores, (w, h))  # DELF locations are (y, x)
