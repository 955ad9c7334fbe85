"""``superglue`` matcher for ``superpoint`` features (network in :mod:`cbir.models.superglue`).

Weights (``superglue_indoor.pth`` / ``superglue_outdoor.pth``, Magic Leap non-commercial) come from ``weights=PATH``
or ``$CBIR_WEIGHTS``; ``variant`` (indoor / outdoor) says which of the two, and so which file name is looked up.
"""

from __future__ import annotations

from typing import Any, Dict

import numpy as np

from ..errors import CbirError
from .base import MATCHERS, Features, Matches, SparseMatcher


@MATCHERS.register("superglue")
class SuperGlueMatcher(SparseMatcher):
    """SuperGlue: attentional GNN + Sinkhorn with a dustbin; matches above ``match_threshold``."""

    name = "superglue"
    supported_features = frozenset({"superpoint"})
    default_conf: Dict[str, Any] = {"variant": "outdoor", "sinkhorn_iterations": 100, "match_threshold": 0.2}

    def __init__(self, features="superpoint", weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(features, weights, device, **conf)
        from ..models.superglue import WEIGHTS_FILES, load_superglue
        from ..weights import resolve_weights

        c = self.conf
        if c["variant"] not in WEIGHTS_FILES:
            raise CbirError(f"matcher 'superglue': variant must be one of {sorted(WEIGHTS_FILES)}, got {c['variant']!r}")
        path = resolve_weights(WEIGHTS_FILES[c["variant"]], weights)
        self.net = load_superglue(
            path, c["variant"], {"sinkhorn_iterations": int(c["sinkhorn_iterations"]), "match_threshold": float(c["match_threshold"])}
        ).to(device)
        self.weights_path = str(path)

    def _match(self, feats0: Features, feats1: Features) -> Matches:
        import torch

        from ._torch import features_to_torch

        t0, t1 = features_to_torch(feats0, self.device), features_to_torch(feats1, self.device)
        with torch.inference_mode():
            m0, _, ms0, _ = self.net(
                t0["keypoints"], t1["keypoints"], t0["descriptors"], t1["descriptors"],
                t0["scores"], t1["scores"], t0["image_size"], t1["image_size"],
            )
        m0 = m0[0].cpu().numpy()
        i0 = np.nonzero(m0 > -1)[0]
        return {
            "matches": np.stack([i0, m0[i0]], axis=1).astype(np.int64).reshape(-1, 2),
            "scores": ms0[0].float().cpu().numpy()[i0].astype(np.float32),
        }
