"""Learned PCA-whitening of float descriptors, fitted on the gallery (unsupervised).

x -> l2n(P^T (x - mu)) with P the top ``dim`` principal directions, each scaled by
eigenvalue^(-power/2): ``power`` 1 is plain whitening, 0.5 the shrunk whitening of cirtorch and
revisitop's baselines (the default). The number of kept directions is capped by the rank of the
gallery (``count - 1``): a 56-image gallery cannot be whitened to 128 dimensions.

``pooled`` and ``fused`` take the option as ``whiten``: ``null`` (off, the default), a dimension
(``256``; ``0`` off), or ``{"dim": 256 | null (full), "power": 0.5}``. The learned mean and
projection are part of the extractor's state (``extractor.h5``), so queries are whitened exactly
as the gallery was.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from ..errors import CbirError
from ..vectors import l2n

#: the state keys (under a prefix) an extractor stores
KEYS = ("mean", "proj")


def normalise_whiten(spec: Any) -> Optional[Dict[str, Any]]:
    """The canonical form of a ``whiten`` option: ``None`` (off) or ``{"dim": int | None, "power": float}``."""
    if spec is None or spec is False or (isinstance(spec, (int, float)) and not isinstance(spec, bool) and spec == 0):
        return None
    if spec is True:
        spec = {}
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = {"dim": spec}
    if not isinstance(spec, dict):
        raise CbirError(f"whiten: expected null, a dimension or {{\"dim\": D, \"power\": P}}, got {spec!r}")
    unknown = sorted(set(spec) - {"dim", "power"})
    if unknown:
        raise CbirError(f"whiten: unknown option(s) {unknown}; options: ['dim', 'power']")
    dim, power = spec.get("dim"), spec.get("power", 0.5)
    if dim is not None and (isinstance(dim, bool) or int(dim) != dim or int(dim) < 1):
        raise CbirError(f"whiten: dim must be a positive integer or null (all directions), got {dim!r}")
    try:
        power = float(power)
    except (TypeError, ValueError):
        raise CbirError(f"whiten: power must be a number, got {power!r}") from None
    if not 0.0 <= power <= 1.0:
        raise CbirError(f"whiten: power must be in [0, 1] (1: full whitening, 0.5: shrunk), got {power}")
    return {"dim": None if dim is None else int(dim), "power": power}


class PCAWhitening:
    """Fit on rows ``(n, d)``; ``apply`` gives L2-normalised ``(n, k)`` rows."""

    def __init__(self, spec: Dict[str, Any]) -> None:
        self.spec = spec
        self.mean: Optional[np.ndarray] = None
        self.proj: Optional[np.ndarray] = None

    @property
    def fitted(self) -> bool:
        return self.proj is not None

    def out_dim(self, in_dim: int) -> int:
        """The output dimension (before fitting: the requested one, capped by ``in_dim``)."""
        if self.proj is not None:
            return int(self.proj.shape[1])
        return int(min(self.spec["dim"] or in_dim, in_dim))

    def fit(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        n, d = x.shape
        if n < 2:
            raise CbirError(f"whiten: needs at least 2 gallery descriptors to learn a PCA, got {n}")
        self.mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        eig = s ** 2 / (n - 1)
        rank = int((eig > eig[0] * 1e-10).sum()) if eig[0] > 0 else 0
        k = int(min(self.spec["dim"] or d, d, rank, n - 1))
        if k < 1:
            raise CbirError("whiten: the gallery descriptors do not vary; nothing to learn")
        scale = eig[:k] ** (-0.5 * self.spec["power"])
        self.proj = (vt[:k].T * scale).astype(np.float32)
        self.mean = self.mean.astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.proj is None:
            raise CbirError("whiten: the PCA is not learned (build an index first)")
        x = np.asarray(x, np.float32)
        if x.shape[1] != self.proj.shape[0]:
            raise CbirError(f"whiten: got {x.shape[1]}-d descriptors, the PCA was learned on {self.proj.shape[0]}-d")
        return l2n((x - self.mean) @ self.proj)

    def state(self, prefix: str = "whiten/") -> Dict[str, np.ndarray]:
        if self.proj is None:
            return {}
        return {prefix + "mean": self.mean, prefix + "proj": self.proj}

    def load_state(self, arrays: Dict[str, np.ndarray], prefix: str = "whiten/") -> Dict[str, np.ndarray]:
        """Take this PCA's arrays out of ``arrays``; returns the others."""
        rest = {k: v for k, v in arrays.items() if not k.startswith(prefix)}
        mine = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
        if mine:
            if set(mine) != set(KEYS):
                raise CbirError(f"whiten: state has {sorted(mine)}, expected {list(KEYS)}")
            mean, proj = np.asarray(mine["mean"], np.float32), np.asarray(mine["proj"], np.float32)
            if mean.ndim != 1 or proj.ndim != 2 or proj.shape[0] != mean.shape[0]:
                raise CbirError(f"whiten: mean {mean.shape} and projection {proj.shape} do not fit together")
            self.mean, self.proj = mean, proj
        return rest


def make_whitening(spec: Any) -> Optional[PCAWhitening]:
    spec = normalise_whiten(spec)
    return PCAWhitening(spec) if spec else None
