"""Local features on disk and the extractor wrapper the index build uses.

``local.h5`` follows hloc's layout: one group per image name (a ``/`` in a name makes nested groups) holding
``keypoints``, ``descriptors``, ``scores`` and ``image_size``. HDF5 only, never pickle. Arrays are stored in the
dtypes they come in: the compact confs (:mod:`cbir.local.compact`) write ``uint16`` keypoints and ``float16``
descriptors and scores, and every reader gets float32 back. Groups are written with HDF5's 1.8 object format
(``libver=("v108", "v110")``): 1.3 KB of overhead per image instead of 2.3 KB, readable by any HDF5 since 1.8.

:func:`make_local_extractor` wraps a registered extractor (or a named conf of :mod:`cbir.local.confs`) for the engine:
it shrinks images to ``max_side`` (``conf['max_side']``, default 1024), reports keypoints in the frame of the image
it was given, projects and rounds the features as they will be stored, and names itself
(:meth:`LocalExtractor.key`, :meth:`LocalExtractor.identity`) so an index records exactly which features it stores
and a rebuild can reuse them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from ..errors import CbirError
from .base import FEATURE_KEYS, Features, as_rgb8, check_features, make_features

DEFAULT_MAX_SIDE = 1024
#: HDF5 object format of written groups (see the module docstring)
LIBVER = ("v108", "v110")


# ----------------------------------------------------------------------------- plain functions


def write_local_features(h5, name: str, feats: Features, overwrite: bool = True, half_descriptors: bool = False) -> None:
    """Store ``feats`` under group ``name`` of the open ``h5py.File`` (or file path) ``h5``."""
    import h5py

    check_features(feats, f"features of {name!r}")
    if not isinstance(h5, h5py.Group):
        with h5py.File(h5, "a") as f:
            return write_local_features(f, name, feats, overwrite, half_descriptors)
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


def read_local_features(h5, name: str) -> Features:
    """Features of ``name`` from ``h5`` (open file or path), with the documented dtypes."""
    import h5py

    if not isinstance(h5, h5py.Group):
        if not os.path.isfile(h5):
            raise CbirError(f"{h5}: local features file not found")
        with h5py.File(h5, "r") as f:
            return read_local_features(f, name)
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
                from ..index.atomic import SafeFile, write_error

                try:
                    self._raw = open(self.path, "r+b" if self.path.is_file() else "w+b", buffering=0)
                except OSError as e:
                    raise write_error(self.path, e) from None
                self._safe = SafeFile(self._raw)
                self._h5 = h5py.File(self._safe, "r+" if self.path.stat().st_size else "w", libver=LIBVER)
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
        write_local_features(self._h5, self._key(name), feats)

    def get(self, name: str) -> Features:
        return read_local_features(self._h5, self._key(name))

    def get_many(self, names: Iterable[str]) -> List[Optional[Features]]:
        """Features of ``names`` (None where an image has none): only those groups are read."""
        out: List[Optional[Features]] = []
        for n in names:
            out.append(self.get(n) if n in self else None)
        return out

    def nbytes(self) -> int:
        """Size of the file on disk."""
        return int(self.path.stat().st_size)

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
            from ..index.atomic import write_error

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
    """A registered extractor plus ``max_side``, an optional descriptor projection and storage dtypes; keypoints come
    back in the frame of the image given.

    ``name`` is a registered extractor (``sift``, ``xfeat``...: :data:`~cbir.local.confs.LOCAL_DEFAULTS` fill in
    ``max_keypoints`` and ``max_side``, storage stays float32) or a named conf of :data:`~cbir.local.confs.LOCAL_CONFS`
    (``default``); ``conf`` overrides either. Besides the extractor's own options ``conf`` takes ``max_side``,
    ``weights``, ``device``, ``project`` (``{"basis", "dim"}``, :class:`~cbir.local.compact.Projection`) and
    ``storage`` (``{"descriptors": "float16", "keypoints": "uint16", "scores": "float16"}``).
    """

    def __init__(self, name: str, conf: Optional[Dict[str, Any]] = None) -> None:
        from . import build_extractor
        from .compact import Projection, check_storage
        from .confs import check_local_name, local_conf

        check_local_name(name)
        self.conf_name = name
        name, base = local_conf(name)
        conf = {**base, **dict(conf or {})}
        self.max_side = int(conf.pop("max_side", DEFAULT_MAX_SIDE) or 0) or None
        weights = conf.pop("weights", None)
        device = conf.pop("device", "cpu")
        project = conf.pop("project", None)
        storage = conf.pop("storage", None)
        self.name = name
        self.extractor = build_extractor(name, weights=weights, device=device, **conf)
        self.projection = Projection(project, name) if project else None
        self.storage = check_storage(storage)
        self._compact = storage is not None

    @property
    def descriptor_dim(self) -> int:
        return self.projection.dim if self.projection is not None else int(self.extractor.descriptor_dim)

    def extract(self, image: np.ndarray) -> Features:
        """Features as they will be stored (projected, in the storage dtypes)."""
        from .compact import compact
        from .pair import shrink_to_side, to_original_frame

        image = as_rgb8(image)
        small, scale = shrink_to_side(image, self.max_side)
        f = self.extractor.extract(small)
        if not np.all(scale == 1):
            h, w = image.shape[:2]
            f = make_features(to_original_frame(f["keypoints"], scale), f["descriptors"], f["scores"], (w, h))
        if self.projection is not None:
            f = {**f, "descriptors": self.projection(f["descriptors"])}
        return compact(f, self.storage) if self._compact else f

    def identity(self) -> Dict[str, Any]:
        """Name, full configuration (with ``project`` and ``storage`` when set), max_side, descriptor size and the
        sha256 of the weight file."""
        from ..weights import cached_sha256

        info = self.extractor.info()
        wp = info.get("weights")
        conf = dict(info["conf"])
        if self.projection is not None:
            conf["project"] = self.projection.identity()
        if self._compact:
            conf["storage"] = dict(self.storage)
        return {
            "name": self.name,
            "conf": conf,
            "max_side": self.max_side,
            "descriptor_dim": self.descriptor_dim,
            "weights": {Path(wp).name: cached_sha256(wp)} if wp else {},
        }

    def key(self) -> str:
        """Short digest of :meth:`identity`: equal keys mean interchangeable stored features."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_local_extractor(name: str, conf: Optional[Dict[str, Any]] = None) -> LocalExtractor:
    """The engine's entry point: ``name`` is a named conf (``default``) or a registered local feature (``aliked``,
    ``xfeat``, ``sift``...); ``conf`` overrides its settings (see :class:`LocalExtractor`)."""
    return LocalExtractor(name, conf)


def local_extractor_from_identity(identity: Dict[str, Any]) -> LocalExtractor:
    """The local extractor an index recorded (``manifest['local']['identity']``), exactly as it was built."""
    conf = dict(identity.get("conf") or {})
    conf["max_side"] = identity.get("max_side")
    return LocalExtractor(str(identity["name"]), conf)
