"""``vlad``: local descriptors aggregated on a codebook learned on the gallery (Jegou et al. 2010).

For each image: local descriptors (RootSIFT by default, or XFeat / ALIKED / DISK) are assigned to
their nearest of ``k`` k-means centroids; residuals are summed per centroid, each block is
L2-normalised (intra-normalisation, Arandjelovic & Zisserman 2013), then the signed power law
(``power`` = 0.5) and a global L2. Optional PCA-whitening learned on the gallery (``whiten`` dims).
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional

import numpy as np

from ..errors import CbirError
from ..vectors import l2n
from .base import EXTRACTORS, Extractor


@EXTRACTORS.register("vlad")
class VladExtractor(Extractor):
    name = "vlad"
    needs_fit = True
    default_conf = {
        "local": "rootsift",
        "local_conf": {"max_keypoints": 1000},
        "k": 64,
        "fit_images": 500,
        "fit_descriptors": 200_000,
        "power": 0.5,
        "intra": True,
        "whiten": 0,
        "max_side": 512,
        "seed": 0,
    }

    def __init__(self, conf=None) -> None:
        super().__init__(conf)
        self._local = None
        self.centroids: Optional[np.ndarray] = None
        self.pca_mean: Optional[np.ndarray] = None
        self.pca_proj: Optional[np.ndarray] = None
        self._assign = None

    # -- parts -------------------------------------------------------------------------
    @property
    def local(self):
        if self._local is None:
            from ..local import build_extractor

            self._local = build_extractor(self.conf["local"], **(self.conf["local_conf"] or {}))
        return self._local

    @property
    def needs_post_fit(self) -> bool:  # type: ignore[override]
        return bool(self.conf["whiten"])

    @property
    def raw_dim(self) -> int:
        if self.centroids is None:
            raise CbirError("vlad: the codebook is not learned yet")
        return int(self.centroids.size)

    @property
    def dim(self) -> int:
        if self.pca_proj is not None:
            return int(self.pca_proj.shape[1])
        if self.conf["whiten"]:
            return int(min(self.conf["whiten"], self.raw_dim))
        return self.raw_dim

    def weights(self) -> Dict[str, str]:
        path = getattr(self.local, "weights_path", None)
        if not path:
            return {}
        from ..weights import cached_sha256

        return {os.path.basename(str(path)): cached_sha256(path)}

    def _descriptors(self, img: np.ndarray) -> np.ndarray:
        d = np.asarray(self.local.extract(img)["descriptors"], np.float32)
        return d.reshape(-1, d.shape[-1]) if d.size else np.zeros((0, 1), np.float32)

    # -- learning ----------------------------------------------------------------------
    def fit(self, images: Iterable[np.ndarray], wrap=None, n: Optional[int] = None) -> None:
        """Learn the codebook from ``images`` (consumed once, one at a time; ``n``: how many there are)."""
        c = self.fit_collector(n)
        for img in (wrap or (lambda it, desc: it))(images, f"vlad: {self.conf['local']} descriptors for the codebook"):
            c.add(img)
        c.finish()

    def fit_collector(self, n: Optional[int] = None) -> "_Collector":
        return _Collector(self, n)

    def fit_post(self, raw: np.ndarray) -> None:
        x = np.asarray(raw, np.float64)
        dims = int(min(self.conf["whiten"], x.shape[0] - 1, x.shape[1]))
        self.pca_mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - self.pca_mean, full_matrices=False)
        scale = 1.0 / np.maximum(s[:dims] / np.sqrt(max(1, len(x) - 1)), 1e-6)
        self.pca_proj = (vt[:dims].T * scale).astype(np.float32)

    @property
    def fit_state_keys(self):
        return ["centroids"]

    def state(self) -> Dict[str, np.ndarray]:
        st: Dict[str, np.ndarray] = {}
        if self.centroids is not None:
            st["centroids"] = self.centroids
        if self.pca_proj is not None:
            st["pca_mean"] = self.pca_mean.astype(np.float32)
            st["pca_proj"] = self.pca_proj
        return st

    def load_state(self, arrays: Dict[str, np.ndarray]) -> None:
        if "centroids" not in arrays:
            raise CbirError("vlad: state without a codebook")
        self.centroids = np.asarray(arrays["centroids"], np.float32)
        self.pca_mean = arrays.get("pca_mean")
        self.pca_proj = arrays.get("pca_proj")
        self._assign = None

    # -- description ---------------------------------------------------------------------
    def aggregate(self, desc: np.ndarray) -> np.ndarray:
        """VLAD of one image's local descriptors ``(n, d)`` -> ``(k * d,)``."""
        import faiss

        C = self.centroids
        if C is None:
            raise CbirError("vlad: the codebook is not learned (build an index first)")
        k, d = C.shape
        v = np.zeros((k, d), np.float32)
        if len(desc) == 0:
            return v.ravel()
        if desc.shape[1] != d:
            raise CbirError(f"vlad: local descriptors are {desc.shape[1]}-d, the codebook {d}-d")
        if self._assign is None:
            self._assign = faiss.IndexFlatL2(d)
            self._assign.add(C)
        _, a = self._assign.search(np.ascontiguousarray(desc, np.float32), 1)
        a = a[:, 0]
        np.add.at(v, a, desc - C[a])
        if self.conf["intra"]:
            v = l2n(v)
        v = v.ravel()
        p = float(self.conf["power"])
        if p != 1.0:
            v = np.sign(v) * np.abs(v) ** p
        return v

    def extract(self, images: List[np.ndarray]) -> np.ndarray:
        out = np.stack([self.aggregate(self._descriptors(img)) for img in images]).astype(np.float32)
        return l2n(out)

    def post(self, raw: np.ndarray) -> np.ndarray:
        x = l2n(raw)
        if self.pca_proj is not None:
            x = (x - self.pca_mean) @ self.pca_proj
        return l2n(x)


class _Collector:
    """Gathers a bounded sample of local descriptors image by image, then runs k-means."""

    def __init__(self, ext: VladExtractor, n: Optional[int] = None) -> None:
        self.ext = ext
        self.rng = np.random.default_rng(ext.conf["seed"])
        n_images = min(int(ext.conf["fit_images"]), int(n)) if n else int(ext.conf["fit_images"])
        self.per = max(1, int(ext.conf["fit_descriptors"]) // max(1, n_images))
        self.chunks: List[np.ndarray] = []

    def add(self, img: np.ndarray) -> None:
        d = self.ext._descriptors(img)
        if len(d) > self.per:
            d = d[self.rng.choice(len(d), self.per, replace=False)]
        if len(d):
            self.chunks.append(d)

    def finish(self) -> None:
        import faiss

        ext = self.ext
        if not self.chunks:
            raise CbirError("vlad: no local descriptors in the fit sample")
        X = np.ascontiguousarray(np.concatenate(self.chunks), dtype=np.float32)
        k = int(ext.conf["k"])
        if len(X) < k:
            raise CbirError(f"vlad: {len(X)} descriptors in the fit sample, fewer than k={k} words")
        km = faiss.Kmeans(X.shape[1], k, niter=25, seed=int(ext.conf["seed"]), spherical=False, verbose=False)
        km.train(X)
        ext.centroids = km.centroids.astype(np.float32)
        ext._assign = None
        self.chunks = []
