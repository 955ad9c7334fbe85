"""Our MobileNetV2 / ResNet match torchvision's checkpoint layout and behave as documented.

torchvision is not importable here, so the reference numbers are torchvision's published parameter
counts and key names/shapes, plus full expected key lists derived independently from the
architectures' definitions (block counts, expansion ratios, which blocks get a downsample).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Iterator, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from cbir.models import mobilenetv2 as mnv2_mod
from cbir.models import resnet as resnet_mod
from cbir.models.mobilenetv2 import MobileNetV2
from cbir.models.resnet import resnet18, resnet34, resnet50, resnet101, resnet152

from helpers import assert_close_rel

#: a module against the functional ops it is made of: the same float32 kernels (measured: identical here), but another
#: thread count or CPU may reorder a sum, ~1e-7 relative. ||a - b|| <= REF_REL ||b|| leaves 100x for that; a missing
#: skip, a wrong stride, BN or activation changes the output by O(1).
REF_REL = 1e-5

BUILDERS: Dict[str, Callable[..., torch.nn.Module]] = {
    "mobilenet_v2": MobileNetV2,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}

# torchvision's published figures (torchvision.models docs, "num_params").
TORCHVISION_PARAMS = {
    "mobilenet_v2": 3_504_872,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Run this module's small forwards on one intra-op thread, restoring the setting afterwards.

    On a busy 2-core machine OpenMP barriers between the many tiny ops cost far more than the
    arithmetic (tens of seconds instead of well under one); one thread avoids that.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


@functools.lru_cache(maxsize=None)
def _meta_cached(name: str, num_classes: int) -> torch.nn.Module:
    with torch.device("meta"):
        return BUILDERS[name](num_classes=num_classes).eval()


def _meta(name: str, num_classes: int = 1000) -> torch.nn.Module:
    """Built on the meta device (shapes and keys, no memory, no init cost); shared, so do not modify."""
    return _meta_cached(name, num_classes)


def _bn(prefix: str) -> List[str]:
    return [f"{prefix}.{s}" for s in BN_SUFFIXES]


def expected_mobilenet_v2_keys() -> List[str]:
    """torchvision mobilenet_v2 state-dict keys, from the (t, c, n, s) table of the paper."""
    keys = ["features.0.0.weight", *_bn("features.0.1")]
    i = 1
    for t, _c, n, _s in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):
        for _ in range(n):
            p = f"features.{i}.conv"
            j = 0
            if t != 1:  # expand ConvBNReLU6
                keys += [f"{p}.0.0.weight", *_bn(f"{p}.0.1")]
                j = 1
            keys += [f"{p}.{j}.0.weight", *_bn(f"{p}.{j}.1")]  # depthwise ConvBNReLU6
            keys += [f"{p}.{j + 1}.weight", *_bn(f"{p}.{j + 2}")]  # linear projection + BN
            i += 1
    assert i == 18
    keys += ["features.18.0.weight", *_bn("features.18.1"), "classifier.1.weight", "classifier.1.bias"]
    return keys


RESNET_LAYOUT = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}


def expected_resnet_keys(name: str) -> List[str]:
    """torchvision resnet state-dict keys: BasicBlock nets have no downsample in layer1, Bottleneck nets do."""
    kind, counts = RESNET_LAYOUT[name]
    n_conv = 2 if kind == "basic" else 3
    keys = ["conv1.weight", *_bn("bn1")]
    for li, n in enumerate(counts, start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            for c in range(1, n_conv + 1):
                keys += [f"{p}.conv{c}.weight", *_bn(f"{p}.bn{c}")]
            if b == 0 and (li > 1 or kind == "bottleneck"):
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    keys += ["fc.weight", "fc.bias"]
    return keys


def _randomize_bn_stats(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every BN non-trivial affine params and running stats, so eval-mode outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.num_batches_tracked.fill_(7)


# ----------------------------------------------------------------------------------------------
# Checkpoint layout
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(BUILDERS))
def test_parameter_count_matches_torchvision(name: str) -> None:
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize(
    "name,entries",
    [("mobilenet_v2", 314), ("resnet18", 122), ("resnet34", 218), ("resnet50", 320), ("resnet101", 626), ("resnet152", 932)],
)
def test_state_dict_entry_count(name: str, entries: int) -> None:
    # Every BatchNorm2d contributes 5 entries (incl. running stats and num_batches_tracked).
    assert len(_meta(name).state_dict()) == entries


@pytest.mark.parametrize("name", list(BUILDERS))
def test_state_dict_keys_exactly_torchvision_order(name: str) -> None:
    expected = expected_mobilenet_v2_keys() if name == "mobilenet_v2" else expected_resnet_keys(name)
    assert list(_meta(name).state_dict().keys()) == expected


KNOWN_SHAPES: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.weight": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.num_batches_tracked": (),
        "features.14.conv.1.0.weight": (576, 1, 3, 3),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.bias": (1280,),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    },
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.conv2.weight": (512, 512, 3, 3),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.weight": (256,),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.running_var": (1024,),
        "layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    },
    "resnet152": {
        "layer2.7.conv3.weight": (512, 128, 1, 1),
        "layer3.35.bn3.weight": (1024,),
        "fc.weight": (1000, 2048),
    },
}


@pytest.mark.parametrize("name", list(KNOWN_SHAPES))
def test_known_key_shapes(name: str) -> None:
    sd = _meta(name).state_dict()
    for key, shape in KNOWN_SHAPES[name].items():
        assert key in sd, key
        assert tuple(sd[key].shape) == shape, key
    assert sd[next(k for k in sd if k.endswith("num_batches_tracked"))].dtype == torch.long


def test_no_classifier_when_num_classes_zero() -> None:
    m = _meta("mobilenet_v2", num_classes=0)
    with torch.device("meta"):
        r = resnet50(num_classes=0)  # own instance: the load below assigns into it
    assert not any(k.startswith("classifier") for k in m.state_dict())
    assert not any(k.startswith("fc") for k in r.state_dict())
    # A full torchvision checkpoint loads into the headless net with only the head left over.
    full = _meta("resnet50").state_dict()
    res = r.load_state_dict(full, strict=False, assign=True)
    assert res.missing_keys == [] and sorted(res.unexpected_keys) == ["fc.bias", "fc.weight"]


def test_custom_num_classes_and_width() -> None:
    assert tuple(_meta("resnet34", num_classes=10).state_dict()["fc.weight"].shape) == (10, 512)
    half = MobileNetV2(num_classes=5, width_mult=0.5).state_dict()
    assert tuple(half["features.0.0.weight"].shape) == (16, 3, 3, 3)
    assert tuple(half["features.17.conv.2.weight"].shape) == (160, 960 // 2, 1, 1)
    assert tuple(half["features.18.0.weight"].shape) == (1280, 160, 1, 1)  # last channel never shrinks
    assert tuple(half["classifier.1.weight"].shape) == (5, 1280)
    assert tuple(MobileNetV2(width_mult=1.4).state_dict()["classifier.1.weight"].shape) == (1000, 1792)


def test_make_divisible() -> None:
    assert mnv2_mod.make_divisible(32 * 0.5) == 16
    assert mnv2_mod.make_divisible(24 * 0.35) == 8
    assert mnv2_mod.make_divisible(1280 * 1.4) == 1792
    assert mnv2_mod.make_divisible(16 * 0.75) == 16  # 12 -> 16 (int(12+4)//8*8)
    assert mnv2_mod.make_divisible(100) == 104  # never below 90 % of v, nearest multiple otherwise


# ----------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "resnet50"])
def test_strict_round_trip_through_torch_save(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    src = BUILDERS[name]().eval()
    _randomize_bn_stats(src)
    path = tmp_path / f"{name}.pth"
    torch.save(src.state_dict(), path)

    torch.manual_seed(1)
    dst = BUILDERS[name]().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = dst(x)
    state = torch.load(path, map_location="cpu", weights_only=True)
    result = dst.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    with torch.no_grad():
        ref, out = src(x), dst(x)
    assert torch.equal(ref, out)
    assert not torch.allclose(before, out)  # the load actually changed something


def test_strict_load_rejects_wrong_layout() -> None:
    with torch.device("meta"):
        sd = MobileNetV2().state_dict()
        sd["features.1.conv.3.weight"] = sd.pop("features.1.conv.2.weight")
        with pytest.raises(RuntimeError, match="features.1.conv.3.weight"):
            MobileNetV2().load_state_dict(sd, strict=True, assign=True)
        with pytest.raises(RuntimeError, match="size mismatch"):  # BasicBlock weights into a Bottleneck net
            resnet50().load_state_dict(resnet18().state_dict(), strict=True, assign=True)
        with pytest.raises(RuntimeError, match="size mismatch"):  # other width
            MobileNetV2().load_state_dict(MobileNetV2(width_mult=0.75).state_dict(), strict=True, assign=True)


# ----------------------------------------------------------------------------------------------
# Output shapes
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnv2() -> MobileNetV2:
    torch.manual_seed(0)
    m = MobileNetV2().eval()
    _randomize_bn_stats(m)
    return m


@pytest.fixture(scope="module")
def r50() -> resnet_mod.ResNet:
    torch.manual_seed(0)
    m = resnet50().eval()
    _randomize_bn_stats(m)
    return m


def _halvings(h: int, w: int, n: int) -> List[Tuple[int, int]]:
    """Map sides after 1..n stride-2 steps; every 3x3/pad-1, 7x7/pad-3 or maxpool 3/pad-1 step maps n -> ceil(n/2)."""
    out = []
    for _ in range(n):
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


SIZES = [(224, 224), (227, 300)]
STAGE_CHANNELS = {
    "mobilenet_v2": ((6, 13, 18), (32, 96, 1280), (3, 4, 5)),  # stages, channels, number of stride-2 steps
    "resnet18": ((1, 2, 3, 4), (64, 128, 256, 512), (2, 3, 4, 5)),
    "resnet34": ((1, 2, 3, 4), (64, 128, 256, 512), (2, 3, 4, 5)),
    "resnet50": ((1, 2, 3, 4), (256, 512, 1024, 2048), (2, 3, 4, 5)),
    "resnet101": ((1, 2, 3, 4), (256, 512, 1024, 2048), (2, 3, 4, 5)),
    "resnet152": ((1, 2, 3, 4), (256, 512, 1024, 2048), (2, 3, 4, 5)),
}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18", "resnet50"])
def test_output_shapes(name: str, size: Tuple[int, int], mnv2: MobileNetV2) -> None:
    """forward / forward_features / feature_maps shapes at full resolution.

    ResNets are traced on the meta device (same shape rules, no arithmetic); MobileNetV2 runs for
    real, which on CPU is cheaper than its meta trace and also checks the ReLU6 range.
    """
    stages, channels, steps = STAGE_CHANNELS[name]
    sides = _halvings(*size, 5)
    if name == "mobilenet_v2":
        model, headless, x = mnv2, MobileNetV2(num_classes=0).eval(), torch.randn(1, 3, *size)
    else:
        model, headless = _meta(name).eval(), _meta(name, num_classes=0).eval()
        with torch.device("meta"):
            x = torch.empty(1, 3, *size)
    with torch.no_grad():
        logits = model(x)
        feat = model.forward_features(x)
        maps = model.feature_maps(x, stages)
        pooled = headless(x)
    assert logits.shape == (1, 1000)
    assert feat.shape == (1, channels[-1], *sides[-1])
    assert size != (227, 300) or sides[-1] == (8, 10)
    assert [tuple(m.shape) for m in maps] == [(1, c, *sides[k - 1]) for c, k in zip(channels, steps)]
    assert [model.stage_channels(s) for s in stages] == list(channels)
    assert pooled.shape == (1, channels[-1])
    if name == "mobilenet_v2":
        assert torch.isfinite(logits).all()
        assert feat.min() >= 0 and feat.max() <= 6  # features.18 ends with ReLU6
        assert torch.equal(maps[-1], feat)


@pytest.mark.parametrize("name", ["resnet34", "resnet101", "resnet152"])
def test_deeper_resnets_final_map(name: str) -> None:
    """The deeper nets share the code path above; check their last map and pooled width once."""
    model = _meta(name, num_classes=0).eval()
    with torch.device("meta"):
        x = torch.empty(1, 3, 227, 300)
    feat = model.forward_features(x)
    assert feat.shape == (1, STAGE_CHANNELS[name][1][-1], 8, 10)


def test_feature_maps_agree_with_forward_features(mnv2: MobileNetV2, r50: resnet_mod.ResNet) -> None:
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        m13, m18 = mnv2.feature_maps(x, (13, 18))
        assert torch.equal(m18, mnv2.forward_features(x))
        assert torch.equal(m13, mnv2.features[:14](x))
        r3, r4 = r50.feature_maps(x, (3, 4))
        assert torch.equal(r4, r50.forward_features(x))
        assert torch.equal(r50.layer4(r3), r4)


def test_resnet_stage_order_as_asked() -> None:
    torch.manual_seed(0)
    m = resnet18().eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        l3, l1 = m.feature_maps(x, (3, 1))  # order as asked, not sorted
        l1b, l3b = m.feature_maps(x, (1, 3))
    assert l3.shape == (1, 256, 2, 3) and l1.shape == (1, 64, 8, 12)
    assert torch.equal(l1, l1b) and torch.equal(l3, l3b)


def test_feature_maps_rejects_bad_stages(mnv2: MobileNetV2, r50: resnet_mod.ResNet) -> None:
    x = torch.randn(1, 3, 32, 32)
    for bad in ([19], [], [-20]):
        with pytest.raises(ValueError):
            mnv2.feature_maps(x, bad)
    for bad in ([0], [5], []):
        with pytest.raises(ValueError):
            r50.feature_maps(x, bad)
    with torch.no_grad():
        assert torch.equal(mnv2.feature_maps(x, [-1])[0], mnv2.forward_features(x))


def test_headless_forward_is_pooled_features() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 48)
    for model, dim in ((MobileNetV2(num_classes=0), 1280), (resnet18(num_classes=0), 512)):
        model.eval()
        with torch.no_grad():
            out = model(x)
            ref = model.forward_features(x).mean(dim=(2, 3))
        assert out.shape == (2, dim)
        assert_close_rel(out, ref, REF_REL, f"{type(model).__name__} headless forward vs pooled features")


def test_head_is_linear_on_pooled_features(mnv2: MobileNetV2) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = mnv2.forward_features(x).mean(dim=(2, 3))
        ref = F.linear(pooled, mnv2.classifier[1].weight, mnv2.classifier[1].bias)
        assert_close_rel(mnv2(x), ref, REF_REL, "classifier vs linear on pooled features")


# ----------------------------------------------------------------------------------------------
# Semantics a strict load cannot check: skips, strides, activations
# ----------------------------------------------------------------------------------------------


def _bn_eval(x: torch.Tensor, sd: Dict[str, torch.Tensor], p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5)


def test_inverted_residual_matches_reference(mnv2: MobileNetV2) -> None:
    """features.3 (24->24, stride 1) has a skip; features.4 (24->32, stride 2) has none; projection is linear."""
    sd = mnv2.state_dict()
    x = torch.randn(1, 24, 20, 20)

    def block(x: torch.Tensor, i: int, stride: int) -> torch.Tensor:
        p = f"features.{i}.conv"
        y = F.relu6(_bn_eval(F.conv2d(x, sd[f"{p}.0.0.weight"]), sd, f"{p}.0.1"))
        y = F.relu6(_bn_eval(F.conv2d(y, sd[f"{p}.1.0.weight"], stride=stride, padding=1, groups=y.shape[1]), sd, f"{p}.1.1"))
        return _bn_eval(F.conv2d(y, sd[f"{p}.2.weight"]), sd, f"{p}.3")

    with torch.no_grad():
        assert_close_rel(mnv2.features[3](x), x + block(x, 3, 1), REF_REL, "features.3 vs reference block with skip")
        assert_close_rel(mnv2.features[4](x), block(x, 4, 2), REF_REL, "features.4 vs reference block")
    assert [type(b).__name__ == "InvertedResidual" and b.use_res_connect for b in mnv2.features].count(True) == 10


def test_bottleneck_matches_reference_v1_5(r50: resnet_mod.ResNet) -> None:
    """Stride sits on the 3x3 conv (torchvision's v1.5), shortcut is a strided 1x1 projection."""
    sd = {k[len("layer2.0."):]: v for k, v in r50.state_dict().items() if k.startswith("layer2.0.")}
    x = torch.relu(torch.randn(1, 256, 14, 14))
    with torch.no_grad():
        y = F.relu(_bn_eval(F.conv2d(x, sd["conv1.weight"]), sd, "bn1"))
        y = F.relu(_bn_eval(F.conv2d(y, sd["conv2.weight"], stride=2, padding=1), sd, "bn2"))
        y = _bn_eval(F.conv2d(y, sd["conv3.weight"]), sd, "bn3")
        s = _bn_eval(F.conv2d(x, sd["downsample.0.weight"], stride=2), sd, "downsample.1")
        assert_close_rel(r50.layer2[0](x), F.relu(y + s), REF_REL, "layer2.0 vs reference bottleneck")
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer1[0].downsample[0].stride == (1, 1)


def test_resnet_stem() -> None:
    m = _meta("resnet18")
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2) and m.conv1.padding == (3, 3)
    assert m.conv1.bias is None
    assert (m.maxpool.kernel_size, m.maxpool.stride, m.maxpool.padding) == (3, 2, 1)


# ----------------------------------------------------------------------------------------------
# Determinism and builders
# ----------------------------------------------------------------------------------------------


def test_eval_mode_is_deterministic(mnv2: MobileNetV2, r50: resnet_mod.ResNet) -> None:
    x = torch.randn(2, 3, 32, 32)
    for model in (mnv2, r50):
        assert not model.training
        with torch.no_grad():
            a, b = model(x), model(x)
            fa, fb = model.forward_features(x), model.forward_features(x)
        assert torch.equal(a, b) and torch.equal(fa, fb)
        # Same input in a batch of one gives the same row (no batch statistics in eval).
        with torch.no_grad():
            one = model(x[1:])
        # a batch of one runs other kernel blockings than a batch of two: float32 reordering only (measured 1.3e-6)
        assert_close_rel(one, a[1:], 1e-4, f"{type(model).__name__}: batch of one vs row of a batch")
    # Eval mode does not update BN running stats.
    before = r50.bn1.running_mean.clone()
    with torch.no_grad():
        r50(x)
    assert torch.equal(before, r50.bn1.running_mean)


def test_same_seed_same_init() -> None:
    torch.manual_seed(123)
    a = MobileNetV2().state_dict()
    torch.manual_seed(123)
    b = MobileNetV2().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # torchvision's init: BN gamma 1 / beta 0, head N(0, 0.01) with zero bias, convs kaiming fan_out.
    assert torch.equal(a["features.0.1.weight"], torch.ones(32)) and torch.equal(a["features.0.1.bias"], torch.zeros(32))
    assert torch.equal(a["classifier.1.bias"], torch.zeros(1000))
    assert 0.009 < float(a["classifier.1.weight"].std()) < 0.011
    w = a["features.18.0.weight"]  # fan_out = 1280 -> std sqrt(2 / 1280)
    assert abs(float(w.std()) - (2 / 1280) ** 0.5) < 0.002


def test_build_torch_backbone() -> None:
    with torch.device("meta"):
        r = resnet_mod.build_torch_backbone("ResNet-34", num_classes=7)
        m = mnv2_mod.build_torch_backbone("mobilenet_v2", num_classes=3)
        half = mnv2_mod.build_torch_backbone("mobilenet_v2_0.5", 10)
        headless = resnet_mod.build_torch_backbone("resnet_50", num_classes=0)
    assert isinstance(r, resnet_mod.ResNet) and tuple(r.fc.weight.shape) == (7, 512)
    assert [len(r.layer1), len(r.layer2), len(r.layer3), len(r.layer4)] == [3, 4, 6, 3]
    assert isinstance(m, MobileNetV2) and tuple(m.classifier[1].weight.shape) == (3, 1280)
    assert half.features[0][0].out_channels == 16
    assert headless.num_features == 2048 and not any(k.startswith("fc.") for k in headless.state_dict())
    with pytest.raises(ValueError):
        resnet_mod.build_torch_backbone("resnet20", 10)
    with pytest.raises(ValueError):
        mnv2_mod.build_torch_backbone("mobilenet_v3", 10)
