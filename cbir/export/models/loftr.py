"""``loftr``: kornia's LoFTR whole, tensors in and out: two grey images -> ``keypoints0``, ``keypoints1``,
``confidence``; nothing stays outside (:func:`cbir.export.runtime.loftr_match`).
"""

from __future__ import annotations

from typing import Any, Dict

from ...errors import CbirError
from ..spec import ExportSpec, rand_image
from . import MODELS


def loftr_graph(net):
    """kornia ``LoFTR`` with tensor inputs and outputs: grey ``image0``, ``image1`` ``(1, 1, H, W)`` ->
    ``keypoints0 (K, 2)``, ``keypoints1 (K, 2)`` (LoFTR's frame: pixel centres at +0.5), ``confidence (K,)``."""
    from torch import nn

    class LoFTRGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image0, image1):
            # the backbone on each image: kornia batches two images of one size, a branch tracing would freeze
            f0, f1 = self.net.extract_features(image0), self.net.extract_features(image1)
            out = self.net({"features0": f0, "features1": f1})
            return out["keypoints0"], out["keypoints1"], out["confidence"]

    return LoFTRGraph().eval()


def _blocks_image(h: int, w: int, seed: int = 0):
    """A grey ``(1, 1, h, w)`` image of random rectangles on smooth noise: distinctive at LoFTR's 8-pixel cells."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = rand_image(h, w, 1, seed=seed) * 0.5
    for _ in range(40):
        y0, x0 = int(torch.randint(0, h - 8, (1,), generator=g)), int(torch.randint(0, w - 8, (1,), generator=g))
        hh, ww = (int(v) for v in torch.randint(6, 40, (2,), generator=g))
        x[..., y0 : y0 + hh, x0 : x0 + ww] = float(torch.rand(1, generator=g))
    return x


def loftr_identity(net, variant: str, match_threshold: float, border_rm: int, weights_path) -> Dict[str, Any]:
    """What decides LoFTR's graph: the options baked in, ``temp_bug_fix`` (build_loftr derives it from the variant and
    the file name, not the file's content) and the weights."""
    from ...weights import cached_sha256

    return {"model": "loftr", "conf": {"variant": variant, "match_threshold": float(match_threshold), "border_rm": int(border_rm)},
            "temp_bug_fix": bool(net.config["coarse"]["temp_bug_fix"]), "weights": cached_sha256(weights_path)}


def loftr_spec(matcher_net, identity: Dict[str, Any]) -> ExportSpec:
    """The example pair must give coarse matches: tracing follows kornia's branch for "some matches" only then (an
    example without would freeze the empty branch). Tried in turn: a shifted copy, the image itself."""
    import torch

    x = _blocks_image(264, 352)
    a = x[..., :240, :320].contiguous()
    args = None
    for cand in ((a, x[..., 16:256, 24:344].contiguous()), (a, a.clone())):
        with torch.inference_mode():
            if int(matcher_net({"image0": cand[0], "image1": cand[1]})["confidence"].shape[0]) > 0:
                args = cand
                break
    if args is None:
        raise CbirError("loftr export: the example pairs gave no coarse match with these weights and match_threshold; "
                        "lower match_threshold for the export")
    axes = {"image0": {2: "height0", 3: "width0"}, "image1": {2: "height1", 3: "width1"},
            "keypoints0": {0: "k"}, "keypoints1": {0: "k"}, "confidence": {0: "k"}}
    return ExportSpec(name="loftr", module=loftr_graph(matcher_net), args=args, input_names=["image0", "image1"],
                      output_names=["keypoints0", "keypoints1", "confidence"], dynamic_axes=axes, identity=identity,
                      check_args=[(rand_image(200, 256, 1, seed=2), rand_image(224, 288, 1, seed=3))])


def loftr_factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
    """``--weights`` (or ``--matcher-weights``) a LoFTR checkpoint; ``--conf`` variant, match_threshold, border_rm."""
    from ...local.loftr import build_loftr

    conf = {"variant": "outdoor", "match_threshold": 0.2, "border_rm": 2, **(conf or {})}
    unknown = sorted(set(conf) - {"variant", "match_threshold", "border_rm"})
    if unknown:
        raise CbirError(f"loftr export: unknown option(s) {unknown}; accepted: border_rm, match_threshold, variant")
    net, path = build_loftr(matcher_weights or weights, conf["variant"], conf["match_threshold"], conf["border_rm"])
    return loftr_spec(net, loftr_identity(net, conf["variant"], conf["match_threshold"], conf["border_rm"], path))


MODELS.register("loftr")(loftr_factory)
