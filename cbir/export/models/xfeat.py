"""``local:xfeat``: XFeat's CNN up to its dense maps (descriptors, keypoint heatmap, reliability).

Outside the graph: before, kornia's bilinear resize to sides that are multiples of 32; after, NMS, top-k and bicubic
sampling (:func:`cbir.export.runtime.xfeat_detect`).
"""

from __future__ import annotations

from ..spec import ExportSpec, rand_image
from . import MODELS
from .local import local_factory, local_identity, local_spec


def xfeat_dense(net):
    """XFeat (kornia ``KF.XFeat``) up to its dense maps: image ``(B, 3, H, W)`` in [0, 1], ``H`` and ``W`` multiples
    of 32 -> ``feats (B, 64, H/8, W/8)`` L2-normalised, ``heatmap (B, 1, H, W)`` keypoint probabilities,
    ``reliability (B, 1, H/8, W/8)``.

    kornia first resizes the image (bilinear) to its sides floored to multiples of 32; that resize stays outside the
    graph (onnxruntime's Resize moved the heatmap by up to 8e-5, against 4e-6 without it)."""
    import torch.nn.functional as F
    from torch import nn

    class XFeatDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net.net

        def forward(self, image):
            M1, K1, H1 = self.net(image)
            M1 = F.normalize(M1, dim=1)
            return M1, type(net)._get_kpts_heatmap(K1), H1

    return XFeatDense().eval()


def xfeat_spec(ext) -> ExportSpec:
    maps = {"feats": {0: "batch", 2: "h8", 3: "w8"}, "heatmap": {0: "batch", 2: "h32", 3: "w32"}, "reliability": {0: "batch", 2: "h8", 3: "w8"}}
    spec = local_spec("local:xfeat", xfeat_dense(ext.net), local_identity(ext), list(maps), maps,
                      "before: bilinear resize to the sides floored to multiples of 32; after: NMS (5x5) over the heatmap, "
                      "threshold, top-k, score = heatmap x reliability, bicubic sampling of feats (kornia "
                      "XFeat.detectAndCompute around its network)", size=(224, 320))
    spec.check_args = [(rand_image(288, 192, seed=1),), (rand_image(256, 384, seed=2),)]
    return spec


MODELS.register("local:xfeat")(local_factory("xfeat", xfeat_spec))
