"""Local features on disk and the extractor wrapper the index build uses.

``local.h5`` follows hloc's layout: one group per image name (a ``/`` in a name makes nested groups) holding
``keypoints``, ``descriptors``, ``scores`` and ``image_size``. HDF5 only, never pickle.

:func:`make_local_extractor` wraps a registered extractor for the engine: it shrinks images to ``max_side``
(``conf['max_side']``, default 1024) and reports keypoints in the frame of the image it was given, and it names
itself (:meth:`LocalExtractor.key`, :meth:`LocalExtractor.identity`) so an index records exactly which features it
stores and a rebuild can reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np

from ..errors import CbirError
from .base import FEATURE_KEYS, Features, as_rgb8, check_features, make_features

DEFAULT_MAX_SIDE = 1024


# ----------------------------------------------------------------------------- plain functions


def write_features(h5, name: str, feats: Features, overwrite: bool = True, half_descriptors: bool = False) -> None:
    """Store ``feats`` under group ``name`` of the open ``h5py.File`` (or file path) ``h5``."""
    import h5py

    check_features(feats, f"features of {name!r}")
    if not isinstance(h5, h5py.Group):
        with h5py.File(h5, "a") as f:
            return write_features(f, name, feats, overwrite, half_descriptors)
    if name in h5:
        if not overwrite:
            raise CbirError(f"{h5.file.filename}: features of {name!r} already stored")
        del h5[name]
    g = h5.create_group(name)
    for k in FEATURE_KEYS:
        arr = np.asarray(feats[k])
        if k == "descriptors" and half_descriptors:
            arr = arr.astype(np.float16)
        g.create_dataset(k, data=arr)


def read_features(h5, name: str) -> Features:
    """Features of ``name`` from ``h5`` (open file or path), with the documented dtypes."""
    import h5py

    if not isinstance(h5, h5py.Group):
        if not os.path.isfile(h5):
            raise CbirError(f"{h5}: local features file not found")
        with h5py.File(h5, "r") as f:
            return read_features(f, name)
    if name not in h5:
        raise CbirError(f"{h5.file.filename}: no local features for {name!r}")
    g = h5[name]
    missing = [k for k in FEATURE_KEYS if k not in g]
    if missing:
        raise CbirError(f"{h5.file.filename}: group {name!r} lacks {missing}")
    return {
        "keypoints": g["keypoints"][()].astype(np.float32),
        "descriptors": g["descriptors"][()].astype(np.float32),
        "scores": g["scores"][()].astype(np.float32),
        "image_size": g["image_size"][()].astype(np.int64),
    }


def stored_names(h5) -> List[str]:
    """Names of every stored image (groups holding ``keypoints``), nested names joined with ``/``."""
    import h5py

    if not isinstance(h5, h5py.Group):
        with h5py.File(h5, "r") as f:
            return stored_names(f)
    names: List[str] = []

    def visit(name, obj):
        if isinstance(obj, h5py.Group) and "keypoints" in obj:
            names.append(name)

    h5.visititems(visit)
    return names


# ----------------------------------------------------------------------------- the store


class LocalFeatureStore:
    """``local.h5`` opened once: ``put``, ``get``, ``in``, ``flush``, ``close``, ``copy_from``.

    ``mode`` is h5py's (``'r'`` to read an index, ``'a'`` while building). Usable as a context manager.
    """

    def __init__(self, path: os.PathLike, mode: str = "r") -> None:
        import h5py

        self.path = Path(path)
        if mode == "r" and not self.path.is_file():
            raise CbirError(f"{self.path}: local features file not found (build the index with --local FEATURES)")
        self._raw = self._safe = None
        try:
            if mode == "r":
                self._h5 = h5py.File(self.path, mode)
            else:  # written through a file object that keeps disk errors (HDF5 crashed at exit after errno 28)
                from ..index.store import _SafeFile, write_error

                try:
                    self._raw = open(self.path, "r+b" if self.path.is_file() else "w+b", buffering=0)
                except OSError as e:
                    raise write_error(self.path, e) from None
                self._safe = _SafeFile(self._raw)
                self._h5 = h5py.File(self._safe, "r+" if self.path.stat().st_size else "w")
        except OSError as e:
            if self._raw is not None:
                self._raw.close()
            raise CbirError(f"{self.path}: cannot open local features ({e})") from None

    @staticmethod
    def _key(name: str) -> str:
        return str(name).lstrip("/")

    def __contains__(self, name: str) -> bool:
        import h5py

        k = self._key(name)
        return k in self._h5 and isinstance(self._h5[k], h5py.Group) and "keypoints" in self._h5[k]

    def put(self, name: str, feats: Features) -> None:
        write_features(self._h5, self._key(name), feats)

    def get(self, name: str) -> Features:
        return read_features(self._h5, self._key(name))

    def names(self) -> List[str]:
        return stored_names(self._h5)

    def __len__(self) -> int:
        return len(self.names())

    def copy_from(self, other: os.PathLike, names: Iterable[str]) -> int:
        """Copy the features of ``names`` found in file ``other`` (skipping those already here); returns how many."""
        import h5py

        n = 0
        with h5py.File(other, "r") as src:
            for name in names:
                k = self._key(name)
                if k in src and k not in self._h5:
                    parent = k.rsplit("/", 1)[0] if "/" in k else None
                    if parent:
                        self._h5.require_group(parent)
                    src.copy(src[k], self._h5, name=k)
                    n += 1
        return n

    def _check_written(self) -> None:
        if self._safe is not None and self._safe.error is not None:
            from ..index.store import write_error

            raise write_error(self.path, self._safe.error, needed=self._safe.attempted)

    def flush(self) -> None:
        self._h5.flush()
        if self._safe is not None:
            self._safe.flush()
        self._check_written()

    def close(self) -> None:
        if self._h5.id.valid:
            self._h5.close()
        if self._raw is not None:
            if self._safe.error is None:
                self._safe.flush()
            self._raw.close()
            self._raw = None
            self._check_written()

    def __enter__(self) -> "LocalFeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- extractor for the engine


class LocalExtractor:
    """A registered extractor plus ``max_side``; keypoints come back in the frame of the image given."""

    def __init__(self, name: str, conf: Optional[Dict[str, Any]] = None) -> None:
        from . import build_extractor

        conf = dict(conf or {})
        self.max_side = int(conf.pop("max_side", DEFAULT_MAX_SIDE) or 0) or None
        weights = conf.pop("weights", None)
        device = conf.pop("device", "cpu")
        self.name = name
        self.extractor = build_extractor(name, weights=weights, device=device, **conf)

    def extract(self, image: np.ndarray) -> Features:
        from .pair import _shrink, _to_original

        image = as_rgb8(image)
        small, scale = _shrink(image, self.max_side)
        f = self.extractor.extract(small)
        if np.all(scale == 1):
            return f
        h, w = image.shape[:2]
        return make_features(_to_original(f["keypoints"], scale), f["descriptors"], f["scores"], (w, h))

    def identity(self) -> Dict[str, Any]:
        """Name, full configuration, max_side, descriptor size and the sha256 of the weight file."""
        from ..weights import file_sha256

        info = self.extractor.info()
        wp = info.get("weights")
        return {
            "name": self.name,
            "conf": info["conf"],
            "max_side": self.max_side,
            "descriptor_dim": info["descriptor_dim"],
            "weights": {Path(wp).name: file_sha256(wp)} if wp else {},
        }

    def key(self) -> str:
        """Short digest of :meth:`identity`: equal keys mean interchangeable stored features."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_local_extractor(name: str, conf: Optional[Dict[str, Any]] = None) -> LocalExtractor:
    """The engine's entry point: ``name`` is a registered local feature (``aliked``, ``xfeat``, ``sift``...)."""
    return LocalExtractor(name, conf)


def iter_features(store: LocalFeatureStore, names: Iterable[str]) -> Iterator[Features]:
    """Features of ``names`` one at a time (memory stays that of one image)."""
    for n in names:
        yield store.get(n)
