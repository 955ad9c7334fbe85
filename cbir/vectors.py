"""Descriptor vectors: the one L2 normalisation of the package, for numpy arrays and torch tensors alike."""

from __future__ import annotations

import numpy as np

#: norms below this count as zero: such a vector is divided by EPS instead (it stays near zero, never NaN)
EPS = 1e-12


def l2n(x, axis: int = -1, eps: float = EPS):
    """``x`` scaled to unit L2 norm along ``axis`` (default the last: one descriptor per row).

    An array (or anything numpy takes) comes back as float32; a torch tensor stays a tensor of its dtype and device
    (``axis`` is its ``dim``: 1 for the channels of ``(B, C, ...)`` maps). A vector with a norm under ``eps`` is
    divided by ``eps``, so a zero vector stays zero.
    """
    if type(x).__module__.split(".")[0] == "torch":
        return x / x.norm(dim=axis, keepdim=True).clamp(min=eps)
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)
