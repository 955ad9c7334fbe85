"""``superpoint+superglue`` (alias ``spsg``): SuperPoint and SuperGlue as one graph, two grey images ->
``mkpts0``, ``mkpts1``, ``confidence``; nothing stays outside.
"""

from __future__ import annotations

from typing import Any, Dict

from ...errors import CbirError
from ..patches import hw
from ..spec import ExportSpec, rand_image
from . import MODELS


def spsg_graph(superpoint, superglue):
    """SuperPoint + SuperGlue as one graph (seed 001's SPSG): grey ``image0``, ``image1`` ``(1, 1, H, W)`` ->
    ``mkpts0 (K, 2)``, ``mkpts1 (K, 2)``, ``confidence (K,)``.

    Same computation as :class:`cbir.models.superglue.SPSG`: the matching is :meth:`SuperGlue.match
    <cbir.models.superglue.SuperGlue.match>` and :func:`~cbir.models.superglue.matched_points`, the code the torch
    path runs. SuperPoint's detection is spelled out with its two trace hazards removed: the keypoint budget is a
    sort then a slice (``topk(k)`` on fewer than ``k`` candidates fails in onnxruntime), and image and map sizes are
    tensors from the input's shape (``torch.tensor([w, h])`` would be frozen at export).
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    from ...models.superglue import matched_points
    from ...models.superpoint import max_pool_nms

    class SPSGGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sp, self.sg = superpoint, superglue

        def detect(self, image):
            c = self.sp.conf
            prob, dense = self.sp.dense(image)
            prob = max_pool_nms(prob, int(c["nms_radius"]))[0]
            H, W = hw(prob)
            b = int(c["remove_borders"])
            ys = torch.arange(H, device=prob.device)[:, None]
            xs = torch.arange(W, device=prob.device)[None, :]
            keep = prob > float(c["keypoint_threshold"])
            if b > 0:
                keep = keep & (ys >= b) & (ys < H - b) & (xs >= b) & (xs < W - b)
            yx = torch.nonzero(keep)
            scores = prob[yx[:, 0], yx[:, 1]]
            scores, order = torch.sort(scores, descending=True)
            k = int(c["max_keypoints"])
            if k >= 0:
                scores, order = scores[:k], order[:k]
            yx = yx.index_select(0, order)
            kpts = torch.stack([yx[:, 1], yx[:, 0]], 1).to(prob.dtype)
            # sample_descriptors with the map size as a tensor
            cell = 8
            dh, dw = hw(dense)
            denom = torch.stack([dw.to(kpts.dtype) * cell - cell / 2 - 0.5, dh.to(kpts.dtype) * cell - cell / 2 - 0.5])
            grid = (kpts - cell / 2 + 0.5) / denom * 2 - 1
            d = F.grid_sample(dense, grid.view(1, 1, -1, 2), mode="bilinear", align_corners=True)
            d = F.normalize(d.reshape(1, dense.shape[1], -1), p=2, dim=1).transpose(1, 2)
            return kpts[None], scores[None], d

        def forward(self, image0, image1):
            k0, s0, d0 = self.detect(image0)
            k1, s1, d1 = self.detect(image1)
            h0, w0 = hw(image0)
            h1, w1 = hw(image1)
            size0 = torch.stack([w0, h0])[None].to(k0.dtype)
            size1 = torch.stack([w1, h1])[None].to(k1.dtype)
            # SuperGlue.match, not forward: its test for no keypoints would be frozen by tracing
            m0, _, ms0, _ = self.sg.match(k0, k1, d0, d1, s0, s1, size0, size1)
            return matched_points(k0, k1, m0, ms0)

    return SPSGGraph().eval()


def spsg_spec(superpoint, superglue, identity: Dict[str, Any]) -> ExportSpec:
    """Spec of loaded SuperPoint and SuperGlue networks (:mod:`cbir.models`); ``identity`` names their options and weights."""
    args = (rand_image(240, 320, 1), rand_image(260, 300, 1, seed=1))
    axes = {"image0": {2: "height0", 3: "width0"}, "image1": {2: "height1", 3: "width1"},
            "mkpts0": {0: "k"}, "mkpts1": {0: "k"}, "confidence": {0: "k"}}
    return ExportSpec(name="superpoint+superglue", module=spsg_graph(superpoint, superglue), args=args,
                      input_names=["image0", "image1"], output_names=["mkpts0", "mkpts1", "confidence"], dynamic_axes=axes,
                      identity=identity, check_args=[(rand_image(200, 256, 1, seed=2), rand_image(240, 320, 1, seed=3))])


def spsg_factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
    """``--weights`` superpoint_v1.pth, ``--matcher-weights`` superglue_{variant}.pth (else ``$CBIR_WEIGHTS``)."""
    from ...models.superglue import WEIGHTS_FILES, load_superglue
    from ...models.superpoint import WEIGHTS_FILE, load_superpoint
    from ...weights import cached_sha256, resolve_weights

    conf = dict(conf or {})
    sp_keys = ("max_keypoints", "keypoint_threshold", "nms_radius", "remove_borders")
    sg_keys = ("sinkhorn_iterations", "match_threshold")
    variant = conf.pop("variant", "outdoor")
    unknown = sorted(set(conf) - set(sp_keys) - set(sg_keys))
    if unknown:
        raise CbirError(f"superpoint+superglue export: unknown option(s) {unknown}; accepted: {sorted(sp_keys + sg_keys + ('variant',))}")
    sp_conf = {"max_keypoints": 1024, **{k: conf[k] for k in sp_keys if k in conf}}
    sg_conf = {k: conf[k] for k in sg_keys if k in conf}
    if variant not in WEIGHTS_FILES:
        raise CbirError(f"superglue variant must be one of {sorted(WEIGHTS_FILES)}, got {variant!r}")
    p_sp = resolve_weights(WEIGHTS_FILE, weights)
    p_sg = resolve_weights(WEIGHTS_FILES[variant], matcher_weights)
    sp, sg = load_superpoint(p_sp, sp_conf), load_superglue(p_sg, variant, sg_conf)
    ident = {"model": "superpoint+superglue", "superpoint": dict(sp.conf), "superglue": dict(sg.conf),
             "weights": {"superpoint": cached_sha256(p_sp), "superglue": cached_sha256(p_sg)}}
    return spsg_spec(sp, sg, ident)


MODELS.register("superpoint+superglue")(spsg_factory)
MODELS.register("spsg")(spsg_factory)
