"""Batch norm folded into convolutions (cbir/models/fold.py): every pair found, the same function, training untouched."""

import copy

import pytest
import torch
from torch import nn

from cbir.models import mobilenetv2, resnet
from cbir.models.fold import fold_batchnorm


def _randomised(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, so a wrong fold cannot pass as an identity."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return net.eval()


@pytest.mark.parametrize("make", [lambda: mobilenetv2.MobileNetV2(num_classes=10), lambda: resnet.resnet18(num_classes=10)],
                         ids=["mobilenet_v2", "resnet18"])
def test_folding_keeps_the_function_and_removes_every_batchnorm(make):
    torch.manual_seed(0)
    net = _randomised(make())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    folded = copy.deepcopy(net)
    assert fold_batchnorm(folded) == n_bn > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 96, 128)
    with torch.inference_mode():
        a, b = net(x), folded(x)
    # float32 rounding only: the difference is a few ulps of the output's scale per layer, far below 1e-3 of it
    assert (a - b).abs().max().item() <= 1e-3 * a.abs().max().item()


def test_a_network_in_training_mode_is_left_alone():
    net = mobilenetv2.MobileNetV2(num_classes=10).train()
    assert fold_batchnorm(net) == 0
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())


def test_the_default_backbone_comes_prepared_for_inference_and_computes_the_same():
    from cbir.models.backbones import build_backbone

    prepared, plain = build_backbone("mobilenet_v2"), build_backbone("mobilenet_v2", inference=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert prepared.net.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(3, 3, 160, 224)
    with torch.inference_mode():
        a, b = plain(x), prepared(x)
    for k in a:
        assert a[k].shape == b[k].shape
        assert (a[k] - b[k]).abs().max().item() <= 1e-3 * a[k].abs().max().item(), k
