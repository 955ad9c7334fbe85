"""ResNet-18/34/50/101/152 in plain ``torch.nn``, laid out so ``state_dict()`` matches torchvision's.

Keys and shapes are exactly those of ``torchvision.models.resnet*`` (``conv1.weight``, ``bn1.*``,
``layer{1..4}.{i}.conv1.weight``, ``...downsample.0.weight``, ``...downsample.1.*``, ``fc.*``), so a
checkpoint saved from torchvision loads here with ``strict=True`` without torchvision installed.

Bottleneck blocks put the stride on the 3x3 convolution ("ResNet v1.5"), as torchvision does.

Layout (He et al., 2016)::

    conv1 7x7/2 -> bn1 -> ReLU -> maxpool 3x3/2      stride 4
    layer1 .. layer4                                 strides 4, 8, 16, 32
    global average pool -> fc                        (fc absent when num_classes == 0)
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Type, Union

import torch
from torch import Tensor, nn

__all__ = [
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "build_torch_backbone",
]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; used by ResNet-18/34."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand (x4), with a shortcut; used by ResNet-50/101/152."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """ResNet with torchvision's parameter names.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in layer1..layer4 (e.g. ``(3, 4, 6, 3)`` for ResNet-50).
        num_classes: size of ``fc``; ``0`` builds no ``fc`` and :meth:`forward` then returns the
            globally average-pooled feature (512-d for BasicBlock nets, 2048-d for Bottleneck nets).
        zero_init_residual: zero the last BN gamma of every block (torchvision's option; off by default).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 block counts, got {list(layers)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.num_classes = num_classes
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's init; skipped on the meta device (nothing to fill, and meta RNG ops are slow)."""
        if self.conv1.weight.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out_ch = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_ch:
            downsample = nn.Sequential(_conv1x1(self.inplanes, out_ch, stride), nn.BatchNorm2d(out_ch))
        layers: List[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_ch
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stage_channels(self, stage: int) -> int:
        """Channels of the map that ``layer{stage}`` outputs (stage 1..4)."""
        if stage not in (1, 2, 3, 4):
            raise ValueError(f"stage must be 1..4, got {stage}")
        return 64 * 2 ** (stage - 1) * (self.num_features // 512)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: Tensor) -> Tensor:
        """Output of ``layer4``: ``(B, num_features, ~H/32, ~W/32)``."""
        x = self._stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def feature_maps(self, x: Tensor, stages: Sequence[int] = (2, 3, 4)) -> List[Tensor]:
        """Outputs of ``layer{i}`` for each ``i`` in ``stages`` (each 1..4), in the order given.

        Only the layers up to the deepest requested one are run. Strides are 4, 8, 16, 32 for
        layers 1..4.
        """
        if len(stages) == 0:
            raise ValueError("stages must name at least one stage")
        idx = [int(s) for s in stages]
        bad = [s for s in idx if s not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"ResNet stages are 1..4 (layer1..layer4), got {bad}")
        found = {}
        x = self._stem(x)
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)[: max(idx)], start=1):
            x = layer(x)
            found[i] = x
        return [found[i] for i in idx]

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``, or the pooled ``(B, num_features)`` feature when ``num_classes == 0``."""
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        return self.fc(x)


def resnet18(num_classes: int = 1000) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2): 11,689,512 parameters at 1000 classes."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)


def resnet34(num_classes: int = 1000) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3): 21,797,672 parameters at 1000 classes."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes)


def resnet50(num_classes: int = 1000) -> ResNet:
    """ResNet-50 (Bottleneck, 3-4-6-3): 25,557,032 parameters at 1000 classes."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def resnet101(num_classes: int = 1000) -> ResNet:
    """ResNet-101 (Bottleneck, 3-4-23-3): 44,549,160 parameters at 1000 classes."""
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes)


def resnet152(num_classes: int = 1000) -> ResNet:
    """ResNet-152 (Bottleneck, 3-8-36-3): 60,192,808 parameters at 1000 classes."""
    return ResNet(Bottleneck, (3, 8, 36, 3), num_classes)


_BUILDERS = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}


def build_torch_backbone(arch: str, num_classes: int = 1000) -> ResNet:
    """Build a ResNet by torchvision's name (``resnet18`` .. ``resnet152``; ``resnet-50`` also accepted)."""
    name = arch.lower().replace("-", "").replace("_", "")
    if name not in _BUILDERS:
        raise ValueError(f"unknown ResNet arch {arch!r}; expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[name](num_classes)
