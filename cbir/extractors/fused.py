"""``fused``: weighted concatenation of L2-normalised descriptors of other extractors.

With parts x_i (each L2-normalised) and weights w_i, the fused vector is concat(sqrt(w_i) x_i),
L2-normalised, so its cosine similarity is the w-weighted mean of the parts' cosine similarities.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ..errors import CbirError
from ..vectors import l2n
from .base import EXTRACTORS, Extractor, make_extractor
from .whitening import make_whitening, normalise_whiten

#: the default parts (measured in benchmarks/quality.py; README explains the choice).
#: ImageNet MobileNetV2's last block, average-pooled, carries nearly everything on the measured sets
#: (corel1k P@10 0.970, ukbench56 N-S 4.00 alone); HSV colour at a tenth of its weight adds a little
#: (0.972 / mAP 0.904 vs 0.901). The VLAD parts of the previous default (XFeat, RootSIFT) added nothing
#: measurable on top of it at any weight tried (0.1 to 0.5: equal or lower) and would cost a codebook fit,
#: so they are no longer in the default (they stay available as parts).
DEFAULT_PARTS = [
    {"name": "pooled", "conf": {"backbone": "mobilenet_v2"}, "weight": 1.0},
    {"name": "colour", "conf": {}, "weight": 0.1},
]


@EXTRACTORS.register("fused")
class FusedExtractor(Extractor):
    name = "fused"
    #: ``whiten``: PCA-whitening of the fused vector, learned on the gallery (whitening.py); null: off
    default_conf = {"parts": DEFAULT_PARTS, "max_side": 512, "whiten": None}

    @classmethod
    def conf_from_options(cls, opts) -> Dict[str, Any]:
        """The backbone options go to the pooled part(s); ``fused_parts`` replaces the default parts."""
        popts = opts.pooled
        if not popts and opts.fused_parts is None:
            return {}
        parts = copy.deepcopy(opts.fused_parts if opts.fused_parts is not None else DEFAULT_PARTS)
        for p in parts:
            if p["name"] == "pooled":
                p["conf"] = {**p.get("conf", {}), **popts}
        return {"parts": parts}

    def __init__(self, conf=None) -> None:
        super().__init__(conf)
        parts = self.conf["parts"]
        if not parts:
            raise CbirError("fused: no parts given")
        self.parts: List[Extractor] = []
        self.w: List[float] = []
        recorded = []
        for p in parts:
            if p.get("name") in ("fused", "hash", "semantic"):
                raise CbirError(f"fused: part {p.get('name')!r} cannot be fused (float descriptors of pooled, colour, vlad only)")
            sub_conf = dict(p.get("conf") or {})
            ext = make_extractor(p["name"], sub_conf)
            self.parts.append(ext)
            self.w.append(float(p.get("weight", 1.0)))
            # options a part's backbone filled in (mobilenet_v2: stages, pool) go into the recorded conf
            filled = getattr(ext, "filled_defaults", None)
            recorded.append({**p, "conf": {**sub_conf, **filled}} if filled else p)
        self.conf["parts"] = recorded  # a new list: DEFAULT_PARTS itself is never changed
        # every part sees the same decoded image; parts shrink it further themselves if they want
        sides = [e.max_side for e in self.parts if e.max_side]
        if sides and self.conf["max_side"] is None:
            self.conf["max_side"] = max(sides)
        self.conf["whiten"] = normalise_whiten(self.conf["whiten"])
        self._whiten = make_whitening(self.conf["whiten"])

    @property
    def needs_fit(self) -> bool:  # type: ignore[override]
        return any(e.needs_fit for e in self.parts)

    @property
    def needs_post_fit(self) -> bool:  # type: ignore[override]
        return self._whiten is not None or any(e.needs_post_fit for e in self.parts)

    @property
    def dim(self) -> int:
        d = int(sum(e.dim for e in self.parts))
        return self._whiten.out_dim(d) if self._whiten is not None else d

    @property
    def raw_dim(self) -> int:
        return int(sum(self._raw_dims()))

    def identity(self, with_state: bool = True):
        ident = super().identity(with_state)
        if ident["conf"].get("whiten") is None:  # unset: the identity (and index keys) of before the option existed
            ident["conf"] = {k: v for k, v in ident["conf"].items() if k != "whiten"}
        return ident

    def _raw_dims(self) -> List[int]:
        return [getattr(e, "raw_dim", e.dim) for e in self.parts]

    def weights(self) -> Dict[str, str]:
        out: Dict[str, str] = {}
        for e in self.parts:
            out.update(e.weights())
        return out

    @property
    def fit_images(self) -> int:
        return max(int(e.conf.get("fit_images", 0)) for e in self.parts if e.needs_fit)

    def fit(self, images: Iterable[np.ndarray], wrap=None, n: Optional[int] = None) -> None:
        """One pass over the sample feeds every part that learns something (each at its own size)."""
        parts = [e for e in self.parts if e.needs_fit]
        collectors = [e.fit_collector(n) for e in parts]
        wrap = wrap or (lambda it, desc: it)
        for img in wrap(images, "fused: local descriptors for the codebooks"):
            for e, c in zip(parts, collectors):
                c.add(_resized([img], e.max_side)[0])
        for c in collectors:
            c.finish()

    def state(self) -> Dict[str, np.ndarray]:
        st = {f"part{i}/{k}": v for i, e in enumerate(self.parts) for k, v in e.state().items()}
        return {**st, **(self._whiten.state() if self._whiten is not None else {})}

    def load_state(self, arrays: Dict[str, np.ndarray]) -> None:
        if self._whiten is not None:
            arrays = self._whiten.load_state(arrays)
        unknown = sorted(k for k in arrays if not k.startswith("part"))
        if unknown:
            raise CbirError(f"fused: unexpected state {unknown}")
        for i, e in enumerate(self.parts):
            sub = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"part{i}/")}
            e.load_state(sub)

    @property
    def fit_state_keys(self):
        keys = []
        for i, e in enumerate(self.parts):
            sub = getattr(e, "fit_state_keys", None)
            keys += [f"part{i}/{k}" for k in sub] if sub is not None else [f"part{i}"]
        return keys

    def extract(self, images: List[np.ndarray]) -> np.ndarray:
        return np.concatenate([e.extract(_resized(images, e.max_side)) for e in self.parts], axis=1)

    def _split(self, raw: np.ndarray) -> List[np.ndarray]:
        dims = self._raw_dims()
        if raw.shape[1] != sum(dims):
            raise CbirError(f"fused: got {raw.shape[1]}-d raw rows, expected {sum(dims)}")
        return np.split(raw, np.cumsum(dims)[:-1], axis=1)

    def fit_post(self, raw: np.ndarray) -> None:
        for e, r in zip(self.parts, self._split(raw)):
            if e.needs_post_fit:
                e.fit_post(r)
        if self._whiten is not None:  # on the fused vectors, once every part is final
            self._whiten.fit(self._fuse(raw))

    def _fuse(self, raw: np.ndarray) -> np.ndarray:
        parts = [np.sqrt(w) * e.post(r) for e, w, r in zip(self.parts, self.w, self._split(raw))]
        return l2n(np.concatenate(parts, axis=1))

    def post(self, raw: np.ndarray) -> np.ndarray:
        fused = self._fuse(raw)
        return self._whiten.apply(fused) if self._whiten is not None else fused


def _resized(images: List[np.ndarray], side) -> List[np.ndarray]:
    if not side:
        return images
    from ..data import resize_max_side

    return [resize_max_side(im, side) for im in images]
