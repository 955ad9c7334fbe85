"""The Extractor interface shared by every global descriptor, and the registry that finds them by name."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterable, List, Optional, Sequence

import numpy as np

from ..errors import CbirError
from ..registry import Registry
from ..vectors import l2n

EXTRACTORS: Registry = Registry("extractor", plugins=[f"cbir.extractors.{m}" for m in ("colour", "fused", "hashing", "pooled", "semantic", "vlad")])


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def arrays_digest(arrays: Dict[str, np.ndarray]) -> Optional[str]:
    if not arrays:
        return None
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


@dataclass
class Options:
    """The common extractor options of the command line, as given (None: not given)."""

    backbone: Optional[str] = None
    weights: Optional[str] = None
    head: Optional[str] = None
    pool: Optional[str] = None
    scales: Optional[Sequence[float]] = None
    base: Optional[str] = None
    fused_parts: Optional[list] = None

    @property
    def pooled(self) -> Dict[str, Any]:
        """The options a pooled backbone takes (paths made absolute: an index is queried from any directory)."""
        out: Dict[str, Any] = {}
        if self.backbone is not None:
            prefix, sep, arg = self.backbone.partition(":")
            out["backbone"] = f"{prefix}:{_abs(arg)}" if sep and prefix.endswith("-jit") else self.backbone
        if self.weights is not None:
            out["weights"] = _abs(self.weights)
        if self.pool is not None:
            out["pool"] = self.pool
        if self.scales is not None:
            out["scales"] = [float(x) for x in self.scales]
        return out


def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


class Extractor:
    """A global image descriptor.

    Life cycle, driven by the engine:

    1. ``__init__(conf)``: ``conf`` overrides ``default_conf`` (unknown keys raise).
    2. ``fit(images)`` when ``needs_fit``: learn state (a codebook...) from a sample of gallery images.
    3. ``extract(images)``: raw float32 descriptors ``(n, raw_dim)`` for a batch of RGB uint8 images.
    4. ``fit_post(raw)`` when ``needs_post_fit``: learn a transform on all gallery rows (PCA-whitening...).
    5. ``post(raw)``: final float32 descriptors, L2-normalised (what the cosine index holds).
    6. ``encode(final)`` for binary extractors: packed uint8 codes (what the Hamming index holds).

    ``state()`` / ``load_state()`` carry everything learned in 2 and 4, so a query is described
    exactly as the gallery was. ``identity()`` is what an index records and checks.
    """

    name: ClassVar[str] = ""
    default_conf: ClassVar[Dict[str, Any]] = {}
    binary: ClassVar[bool] = False
    needs_fit: bool = False
    needs_post_fit: bool = False

    @classmethod
    def conf_from_options(cls, opts: "Options") -> Dict[str, Any]:
        """This extractor's conf for the command line's common options (``--backbone``, ``--weights``, ``--pool``,
        ``--scales``, ``--head``, ``--base``): each kind says where they go, so the CLI needs no if-chain."""
        if opts.pooled:
            raise CbirError(f"--extractor {cls.name} has no backbone options (--backbone, --weights, --pool, --scales)")
        return {}

    def __init__(self, conf: Optional[Dict[str, Any]] = None) -> None:
        conf = dict(conf or {})
        unknown = sorted(set(conf) - set(self.default_conf))
        if unknown:
            raise CbirError(f"extractor {self.name!r}: unknown option(s) {unknown}; options: {sorted(self.default_conf)}")
        self.conf: Dict[str, Any] = {**self.default_conf, **conf}

    # -- sizes -------------------------------------------------------------------------
    @property
    def max_side(self) -> Optional[int]:
        """Images are decoded with their longer side reduced to this (``None``: as stored)."""
        return self.conf.get("max_side")

    @property
    def dim(self) -> int:
        """Dimension of the final float descriptor."""
        raise NotImplementedError

    @property
    def code_bits(self) -> int:
        return 0

    # -- learning ------------------------------------------------------------------------
    @property
    def fit_images(self) -> int:
        """How many gallery images ``fit`` samples."""
        return int(self.conf.get("fit_images", 0))

    def fit(self, images: Iterable[np.ndarray], wrap: Callable = None, n: Optional[int] = None) -> None:
        """Learn state from sample ``images`` (an iterable of ``n`` images consumed once); ``wrap(iterable, desc)`` may add a progress bar."""

    def fit_post(self, raw: np.ndarray) -> None:
        pass

    def state(self) -> Dict[str, np.ndarray]:
        return {}

    def load_state(self, arrays: Dict[str, np.ndarray]) -> None:
        if arrays:
            raise CbirError(f"extractor {self.name!r} has no learned state, but state {sorted(arrays)} was given")

    # -- description -----------------------------------------------------------------------
    def extract(self, images: List[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def post(self, raw: np.ndarray) -> np.ndarray:
        return l2n(raw)

    def encode(self, final: np.ndarray) -> np.ndarray:
        raise CbirError(f"extractor {self.name!r} gives float descriptors, not binary codes")

    def describe(self, images: List[np.ndarray]) -> np.ndarray:
        """Final descriptors of query images (extract then post)."""
        return self.post(self.extract(images))

    def bundle(self) -> Dict[str, str]:
        """Files an index must keep a copy of (``{conf key: path}``), recorded in the conf as ``"@key"``."""
        return {}

    # -- identity ------------------------------------------------------------------------
    def weights(self) -> Dict[str, str]:
        """Weight files used, as ``{name: sha256}``."""
        return {}

    def identity(self, with_state: bool = True) -> Dict[str, Any]:
        ident = {"name": self.name, "conf": self.conf, "weights": self.weights()}
        if with_state:
            ident["state"] = arrays_digest(self.state())
        return ident

    def key(self, with_state: bool = True) -> str:
        """Short digest of the identity: rows extracted under the same key are interchangeable."""
        return digest(self.identity(with_state))


def make_extractor(name: str, conf: Optional[Dict[str, Any]] = None) -> Extractor:
    """Build a registered extractor by name (``pooled``, ``semantic``, ``hash``, ``vlad``, ``colour``, ``fused``)."""
    return EXTRACTORS.get(name)(conf)
