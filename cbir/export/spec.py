"""What every export shares: :class:`ExportSpec` (a tensor-only module, its example inputs and dynamic axes, its
identity), the opset, the export format version, and the example inputs.

One module per model in :mod:`cbir.export.models` builds its spec; :mod:`cbir.export.write` writes and checks it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

#: opset of every export (grid_sample needs >= 16)
OPSET = 17
#: bump when a wrapper changes, so cached exports are rebuilt (2: float64 statistics for instance norms and pooling)
EXPORT_FORMAT = 2

@dataclass
class ExportSpec:
    """A tensor-only module ready for ``torch.onnx.export``, with its example inputs and dynamic axes."""

    name: str
    module: Any
    args: Tuple[Any, ...]
    input_names: List[str]
    output_names: List[str]
    dynamic_axes: Dict[str, Dict[int, str]]
    identity: Dict[str, Any]
    whole: bool = True
    outside: str = ""
    #: more example inputs for the check after export (another image size, other point counts)
    check_args: List[Tuple[Any, ...]] = field(default_factory=list)


def rand_image(h: int, w: int, c: int = 3, seed: int = 0):
    """A smooth random image: detectors find maxima, attention sees varied descriptors."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, c, max(2, h // 8), max(2, w // 8), generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


def image_axes(*names: str) -> Dict[str, Dict[int, str]]:
    """Dynamic batch, height and width of image inputs ``names`` (``height``, ``height1``, ...)."""
    return {n: {0: "batch", 2: f"height{i or ''}", 3: f"width{i or ''}"} for i, n in enumerate(names)}
