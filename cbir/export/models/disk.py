"""``local:disk``: DISK's U-Net up to its heatmap and dense descriptors (padding to multiples of 16, cropped back).

Outside the graph: NMS, top-k and sampling (:func:`cbir.export.runtime.disk_detect`).
"""

from __future__ import annotations

from ..patches import hw
from ..spec import ExportSpec
from . import MODELS
from .local import local_factory, local_identity, local_spec


def disk_dense(net):
    """DISK (kornia ``KF.DISK``) up to its dense maps: image ``(B, 3, H, W)`` -> ``heatmap (B, 1, H, W)``,
    ``descriptors (B, 128, H, W)`` (zero padding to multiples of 16, cropped back, as ``pad_if_not_divisible``)."""
    import torch.nn.functional as F
    from torch import nn

    class DiskDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image):
            h, w = hw(image)
            x = F.pad(image, [0, (16 - w % 16) % 16, 0, (16 - h % 16) % 16], value=0.0)
            heat, desc = self.net.heatmap_and_dense_descriptors(x)
            return heat[..., :h, :w], desc[..., :h, :w]

    return DiskDense().eval()


def disk_spec(ext) -> ExportSpec:
    maps = {"heatmap": {0: "batch", 2: "height", 3: "width"}, "descriptors": {0: "batch", 2: "height", 3: "width"}}
    return local_spec("local:disk", disk_dense(ext.net), local_identity(ext), list(maps), maps,
                      "keypoints: kornia's heatmap_to_keypoints (NMS window, threshold, top-k); descriptors read at the keypoints")


MODELS.register("local:disk")(local_factory("disk", disk_spec))
