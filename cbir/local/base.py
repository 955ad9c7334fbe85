"""Shared pieces of local features and matchers: the feature layout, base classes and the two registries.

A *features* dict describes one image in hloc's layout, so it can be written to HDF5 as one group per image:

* ``keypoints``   ``(N, 2)`` float32, ``(x, y)`` pixels of the image given to the extractor, pixel centres on
  integers (OpenCV's and kornia's frame);
* ``descriptors`` ``(N, D)`` float32, L2-normalised;
* ``scores``      ``(N,)`` float32, detection score (higher is better);
* ``image_size``  ``(2,)`` int64, ``(W, H)``.

A *matches* dict (what :meth:`SparseMatcher.match` returns) holds ``matches`` ``(M, 2)`` int64 indices into the
keypoints of image 0 and image 1 and ``scores`` ``(M,)`` float32. A *correspondences* dict (what every matcher can
be turned into, and what geometric verification reads) holds ``keypoints0``, ``keypoints1`` ``(M, 2)`` float32 and
``scores`` ``(M,)`` float32.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import CbirError
from ..registry import Registry

Features = Dict[str, np.ndarray]
Matches = Dict[str, np.ndarray]
Correspondences = Dict[str, np.ndarray]

#: local feature extractors by name (``sift``, ``aliked``, ...); factories take ``weights=``, ``device=``, ``**conf``
#: the modules that register local features and matchers (imported on first lookup)
PLUGINS = tuple(f"cbir.local.{m}" for m in ("sift", "aliked", "disk", "xfeat", "superpoint", "delf", "mnn", "lightglue", "superglue", "loftr"))
EXTRACTORS: Registry = Registry("local feature", plugins=PLUGINS)
#: matchers by name (``mnn``, ``lightglue``, ...); factories take ``features=``, ``weights=``, ``device=``, ``**conf``
MATCHERS: Registry = Registry("matcher", plugins=PLUGINS)

FEATURE_KEYS = ("keypoints", "descriptors", "scores", "image_size")


def merge_conf(default: Mapping[str, Any], conf: Mapping[str, Any], owner: str) -> Dict[str, Any]:
    """``default`` updated by ``conf``; an unknown key raises naming the accepted ones (typos fail loudly)."""
    unknown = sorted(set(conf) - set(default))
    if unknown:
        raise CbirError(f"{owner}: unknown option(s) {unknown}; accepted: {sorted(default)}")
    return {**default, **conf}


def make_features(keypoints, descriptors, scores, image_size) -> Features:
    """Build a features dict with the documented dtypes and shapes from arrays or tensors."""
    kp = _np(keypoints, np.float32).reshape(-1, 2)
    desc = _np(descriptors, np.float32)
    if desc.ndim != 2:
        desc = desc.reshape(kp.shape[0], -1) if kp.shape[0] else desc.reshape(0, 0)
    sc = _np(scores, np.float32).reshape(-1)
    if not (kp.shape[0] == desc.shape[0] == sc.shape[0]):
        raise CbirError(f"inconsistent features: {kp.shape[0]} keypoints, {desc.shape[0]} descriptors, {sc.shape[0]} scores")
    return {
        "keypoints": np.ascontiguousarray(kp),
        "descriptors": np.ascontiguousarray(desc),
        "scores": np.ascontiguousarray(sc),
        "image_size": np.asarray(image_size, dtype=np.int64).reshape(2),
    }


def _np(x, dtype) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=dtype)


def check_features(feats: Mapping[str, Any], what: str = "features") -> None:
    """Raise :class:`CbirError` naming the problem when ``feats`` is not a features dict."""
    missing = [k for k in FEATURE_KEYS if k not in feats]
    if missing:
        raise CbirError(f"{what}: missing {missing} (a features dict has {list(FEATURE_KEYS)})")
    kp, desc = np.asarray(feats["keypoints"]), np.asarray(feats["descriptors"])
    if kp.ndim != 2 or kp.shape[1] != 2:
        raise CbirError(f"{what}: keypoints must be (N, 2), got {kp.shape}")
    if desc.ndim != 2 or desc.shape[0] != kp.shape[0]:
        raise CbirError(f"{what}: descriptors must be (N, D) with N={kp.shape[0]}, got {desc.shape}")


def correspondences(feats0: Features, feats1: Features, matches: Matches) -> Correspondences:
    """Matched keypoint pairs of a sparse match result."""
    m = np.asarray(matches["matches"], dtype=np.int64).reshape(-1, 2)
    return {
        "keypoints0": np.asarray(feats0["keypoints"], np.float32)[m[:, 0]].reshape(-1, 2),
        "keypoints1": np.asarray(feats1["keypoints"], np.float32)[m[:, 1]].reshape(-1, 2),
        "scores": np.asarray(matches["scores"], np.float32).reshape(-1),
    }


def empty_matches() -> Matches:
    return {"matches": np.zeros((0, 2), np.int64), "scores": np.zeros((0,), np.float32)}


def empty_correspondences() -> Correspondences:
    return {"keypoints0": np.zeros((0, 2), np.float32), "keypoints1": np.zeros((0, 2), np.float32), "scores": np.zeros((0,), np.float32)}


class KeypointExtractor:
    """Base class of local feature extractors.

    Subclasses set :attr:`name`, :attr:`default_conf`, :attr:`descriptor_dim` and implement :meth:`_extract`,
    which gets an RGB ``uint8`` ``(H, W, 3)`` array and returns a features dict (see the module docstring).
    """

    name: ClassVar[str] = ""
    default_conf: ClassVar[Dict[str, Any]] = {}
    descriptor_dim: int = 0
    #: weight file looked up by :func:`cbir.weights.resolve_weights` (None: no weights)
    weights_file: ClassVar[Optional[str]] = None

    def __init__(self, weights: Optional[os.PathLike] = None, device: str = "cpu", **conf: Any) -> None:
        self.conf = merge_conf(self.default_conf, conf, f"features {self.name!r}")
        self.device = device
        self.weights_path: Optional[str] = None

    def extract(self, image: np.ndarray) -> Features:
        """Features of one RGB ``uint8`` ``(H, W, 3)`` image (a ``(H, W)`` grey image is accepted too)."""
        image = as_rgb8(image)
        return self._extract(image)

    def _extract(self, image: np.ndarray) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError

    def info(self) -> Dict[str, Any]:
        """What an index manifest records: name, configuration, descriptor size and weight file."""
        return {"name": self.name, "conf": _identity_conf(self.conf), "descriptor_dim": self.descriptor_dim, "weights": self.weights_path}


class Matcher:
    """Base class of every matcher.

    ``supported_features`` lists the feature names a matcher accepts (None: any sparse features);
    ``detector_free`` matchers (LoFTR) take images instead of features.
    """

    name: ClassVar[str] = ""
    default_conf: ClassVar[Dict[str, Any]] = {}
    supported_features: ClassVar[Optional[FrozenSet[str]]] = None
    detector_free: ClassVar[bool] = False

    def __init__(self, features: Optional[str] = None, weights: Optional[os.PathLike] = None, device: str = "cpu", **conf: Any) -> None:
        if features is not None or self.supported_features is not None or self.detector_free:
            check_combination(features, type(self))  # a generic matcher (mnn, kdtree) may be built without a name
        self.features = features
        self.conf = merge_conf(self.default_conf, conf, f"matcher {self.name!r}")
        self.device = device
        self.weights_path: Optional[str] = None

    def info(self) -> Dict[str, Any]:
        return {"name": self.name, "features": self.features, "conf": _identity_conf(self.conf), "weights": self.weights_path}


class SparseMatcher(Matcher):
    """Matches two features dicts; :meth:`match_many` matches one query against many candidates."""

    def check_pair(self, feats0: Features, feats1: Features, what1: str = "image 1") -> None:
        """Raise a clear :class:`CbirError` unless both are features dicts with descriptors of one size."""
        check_features(feats0, "features of image 0")
        check_features(feats1, f"features of {what1}")
        d0, d1 = np.asarray(feats0["descriptors"]).shape[1], np.asarray(feats1["descriptors"]).shape[1]
        if d0 != d1:
            raise CbirError(f"matcher {self.name!r}: descriptor sizes differ ({d0} vs {d1} for {what1}): were both images "
                            "described by the same features?")

    def match(self, feats0: Features, feats1: Features) -> Matches:
        self.check_pair(feats0, feats1)
        if len(feats0["keypoints"]) == 0 or len(feats1["keypoints"]) == 0:
            return empty_matches()
        return self._match(feats0, feats1)

    def _match(self, feats0: Features, feats1: Features) -> Matches:  # pragma: no cover - abstract
        raise NotImplementedError

    def match_many(self, query: Features, candidates: Sequence[Features]) -> List[Matches]:
        """Match ``query`` (as image 0) against each candidate (as image 1); one result per candidate."""
        return [self.match(query, c) for c in candidates]

    def correspondences(self, feats0: Features, feats1: Features) -> Correspondences:
        return correspondences(feats0, feats1, self.match(feats0, feats1))


class DenseMatcher(Matcher):
    """Detector-free matcher: takes two RGB ``uint8`` images and returns correspondences directly."""

    detector_free = True

    def match(self, image0: np.ndarray, image1: np.ndarray) -> Correspondences:  # pragma: no cover - abstract
        raise NotImplementedError

    def match_many(self, query: np.ndarray, candidates: Sequence[np.ndarray]) -> List[Correspondences]:
        return [self.match(query, c) for c in candidates]

    def correspondences(self, image0: np.ndarray, image1: np.ndarray) -> Correspondences:
        return self.match(image0, image1)


def _identity_conf(conf: Mapping[str, Any]) -> Dict[str, Any]:
    """``conf`` without ``runtime`` (torch or onnx: the same features, so stored ones are reused either way)."""
    return {k: v for k, v in conf.items() if k != "runtime"}


def uses_onnx(conf: Mapping[str, Any]) -> bool:
    """Whether a network with configuration ``conf`` runs in onnxruntime (its ``runtime``, else the process default)."""
    from ..runtime import resolve_runtime

    return resolve_runtime(conf.get("runtime")) == "onnx"


def check_combination(features: Optional[str], matcher) -> None:
    """Raise a clear :class:`CbirError` when ``matcher`` (a name or class) cannot match ``features``."""
    if isinstance(matcher, str):
        cls = MATCHERS.get(matcher)
    else:
        cls = matcher
    if cls.detector_free:
        if features not in (None, "", "none"):
            raise CbirError(f"matcher {cls.name!r} is detector-free: it matches images, not {features!r} features (use features=None)")
        return
    if features in (None, "", "none"):
        raise CbirError(f"matcher {cls.name!r} needs local features; choose one of: {', '.join(sorted(cls.supported_features or EXTRACTORS.names()))}")
    if cls.supported_features is not None and features not in cls.supported_features:
        raise CbirError(
            f"matcher {cls.name!r} cannot match {features!r} features: it has weights for {', '.join(sorted(cls.supported_features))} only"
            f" (use 'mnn' or 'kdtree' for any features)"
        )


def as_rgb8(image: np.ndarray) -> np.ndarray:
    """Check and convert an image to RGB ``uint8`` ``(H, W, 3)``."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise CbirError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and float(arr.max()) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.round(arr), 0, 255).astype(np.uint8)
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise CbirError(f"image too small for local features: {arr.shape[1]}x{arr.shape[0]}")
    return np.ascontiguousarray(arr)
