"""``local:aliked`` (and ``local:aliked-n16rot``): ALIKED's CNN up to its dense feature and score maps.

Outside the graph: DKD (NMS, top-k, soft-argmax) and the SDDH descriptor head (:func:`cbir.export.runtime.aliked_detect`).
"""

from __future__ import annotations

from ..patches import hw
from ..spec import ExportSpec
from . import MODELS
from .local import local_factory, local_identity, local_spec


def aliked_dense(net):
    """ALIKED (kornia ``KF.ALIKED``) up to its dense maps: image ``(B, 3, H, W)`` -> ``feature_map (B, dim, H, W)``,
    ``score_map (B, 1, H, W)``; kornia's ``extract_dense_map`` with the centred replicate padding traced as arithmetic."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class AlikedDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image):
            n = self.net
            h, w = hw(image)
            ph, pw = (32 - h % 32) % 32, (32 - w % 32) % 32
            top, left = ph // 2, pw // 2
            x = F.pad(image, [left, pw - left, top, ph - top], mode="replicate")
            x1 = n.block1(x)
            x2 = n.block2(n.pool2(x1))
            x3 = n.block3(n.pool4(x2))
            x4 = n.block4(n.pool4(x3))
            x1 = n.gate(n.conv1(x1))
            x2 = n.gate(n.conv2(x2))
            x3 = n.gate(n.conv3(x3))
            x4 = n.gate(n.conv4(x4))
            x1234 = torch.cat([x1, n.upsample2(x2), n.upsample8(x3), n.upsample32(x4)], dim=1)
            score_map = torch.sigmoid(n.score_head(x1234))
            feature_map = F.normalize(x1234, p=2, dim=1)
            return feature_map[..., top : top + h, left : left + w], score_map[..., top : top + h, left : left + w]

    return AlikedDense().eval()


def aliked_spec(ext) -> ExportSpec:
    maps = {"feature_map": {0: "batch", 2: "height", 3: "width"}, "score_map": {0: "batch", 2: "height", 3: "width"}}
    return local_spec("local:aliked", aliked_dense(ext.net), local_identity(ext), list(maps), maps,
                      "keypoints: kornia's DKD (NMS, top-k or threshold, soft-argmax refinement); descriptors: the SDDH head "
                      "(deformable sampling, learned; kept in torch because the keypoint count is data-dependent)")


MODELS.register("local:aliked")(local_factory("aliked", aliked_spec))
MODELS.register("local:aliked-n16rot")(local_factory("aliked-n16rot", aliked_spec))
