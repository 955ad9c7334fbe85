"""``loftr``: detector-free matching with kornia's LoFTR architecture and a user checkpoint.

LoFTR weights are not redistributable here: pass the official ``.ckpt`` (a Lightning checkpoint,
``{'state_dict': {'matcher.backbone...': ...}}``) as ``weights=PATH``, or put ``loftr_{variant}.ckpt`` in
``$CBIR_WEIGHTS``. ``variant`` is ``outdoor``, ``indoor`` or ``indoor_new``; the last switches the positional
encoding to ``temp_bug_fix=True`` as its checkpoint needs (a path containing ``ds_new`` selects it too).

Images go in grey, in ``[0, 1]``. kornia reports keypoints in LoFTR's frame (pixel centres at ``+0.5``); they are
moved to cbir's frame (centres on integers). ``match_many`` runs the backbone on the query once.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import numpy as np

from ..errors import CbirError
from .base import MATCHERS, Correspondences, DenseMatcher, as_rgb8, uses_onnx

VARIANTS = ("outdoor", "indoor", "indoor_new")


def build_loftr(weights=None, variant: str = "outdoor", match_threshold: float = 0.2, border_rm: int = 2):
    """kornia LoFTR (no download) with the checkpoint at ``weights`` loaded strictly; returns ``(net, path)``."""
    import copy

    import kornia.feature as KF
    from kornia.feature.loftr.loftr import default_cfg

    from ..weights import load_into, load_state_dict, resolve_weights

    if variant not in VARIANTS:
        raise CbirError(f"matcher 'loftr': variant must be one of {VARIANTS}, got {variant!r}")
    path = resolve_weights(f"loftr_{variant}.ckpt", weights)
    cfg = copy.deepcopy(default_cfg)
    cfg["coarse"]["temp_bug_fix"] = variant == "indoor_new" or "ds_new" in str(path)
    cfg["match_coarse"]["thr"] = float(match_threshold)
    cfg["match_coarse"]["border_rm"] = int(border_rm)
    net = KF.LoFTR(pretrained=None, config=cfg)
    state = load_state_dict(path, key="state_dict")
    # the Lightning module holds the network as `matcher`
    state = {(k[len("matcher.") :] if k.startswith("matcher.") else k): v for k, v in state.items()}
    load_into(net, state, path)
    return net.eval(), path


@MATCHERS.register("loftr")
class LoFTRMatcher(DenseMatcher):
    """LoFTR: coarse-to-fine transformer matching of two images; output ``keypoints0``, ``keypoints1``, ``scores``."""

    name = "loftr"
    default_conf: Dict[str, Any] = {"variant": "outdoor", "match_threshold": 0.2, "border_rm": 2,
                                    "runtime": None}  # torch | onnx; None: the process default (--runtime, $CBIR_RUNTIME)

    def __init__(self, features=None, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(features, weights, device, **conf)
        c = self.conf
        net, path = build_loftr(weights, c["variant"], c["match_threshold"], c["border_rm"])
        self.net = net.to(device)
        self.weights_path = str(path)

    def _tensor(self, image: np.ndarray):
        from ._torch import image_tensor

        return image_tensor(as_rgb8(image), grey=True, device=self.device)

    def _run(self, side0: Dict[str, Any], side1: Dict[str, Any]) -> Correspondences:
        import torch

        with torch.inference_mode():
            out = self.net({**side0, **side1})
        k0 = out["keypoints0"].float().cpu().numpy().reshape(-1, 2) - 0.5
        k1 = out["keypoints1"].float().cpu().numpy().reshape(-1, 2) - 0.5
        return {"keypoints0": k0.astype(np.float32), "keypoints1": k1.astype(np.float32), "scores": out["confidence"].float().cpu().numpy().astype(np.float32)}

    def match(self, image0: np.ndarray, image1: np.ndarray) -> Correspondences:
        if uses_onnx(self.conf):  # the whole matcher in onnxruntime (cbir/export)
            from ..runtime import runner

            loftr_match = runner("loftr")

            out = loftr_match(self, self._tensor(image0), self._tensor(image1))
            return {"keypoints0": out["keypoints0"].reshape(-1, 2) - 0.5, "keypoints1": out["keypoints1"].reshape(-1, 2) - 0.5,
                    "scores": out["confidence"].astype(np.float32).reshape(-1)}
        return self._run({"image0": self._tensor(image0)}, {"image1": self._tensor(image1)})

    def match_many(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> List[Correspondences]:
        """One query image against many: the query's backbone features are computed once (torch runtime)."""
        import torch

        if uses_onnx(self.conf):
            return [self.match(query, c) for c in candidates]
        with torch.inference_mode():
            fq = self.net.extract_features(self._tensor(query))
        return [self._run({"features0": fq}, {"image1": self._tensor(c)}) for c in candidates]
