"""Global descriptors, one module per kind, found by name in ``EXTRACTORS``.

``configure()`` turns the command line's common options (backbone, weights, head, pool, scales) into
the config of whichever extractor is asked for, so ``--extractor hash --backbone xfeat`` needs no
special cases in the CLI.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import CbirError
from .base import EXTRACTORS, Extractor, make_extractor

#: what `cbir index build` uses when no --extractor is given
DEFAULT_EXTRACTOR = "fused"

#: the fused parts a semantic head reads by default (`cbir train`): ImageNet MobileNetV2's last block,
#: average-pooled, + HSV colour. Measured (benchmarks/quality.py, head on corel1k's train split, test split):
#: P@10 0.981 (0.980 without colour, 0.974 with GeM over stage13+last; 0.904 for the previous ALIKED-n16 +
#: colour base). No VLAD parts: they over-fitted a linear head on the 500 training images (0.864 vs 0.907
#: with the ALIKED base) and would tie the head to a gallery codebook.
HEAD_BASE_PARTS = [
    {"name": "pooled", "conf": {"backbone": "mobilenet_v2"}, "weight": 1.0},
    {"name": "colour", "conf": {}, "weight": 1.0},
]

_LOADED = False


def load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import colour, fused, hashing, pooled, semantic, vlad  # noqa: F401  (registration)


def names():
    load_all()
    return EXTRACTORS.names()


def _abs(path: str) -> str:
    """Paths go into index configs absolute, so an index can be queried from any working directory."""
    import os

    return os.path.abspath(os.path.expanduser(path))


def _pooled_opts(backbone, weights, pool, scales) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    if backbone is not None:
        prefix, sep, arg = backbone.partition(":")
        out["backbone"] = f"{prefix}:{_abs(arg)}" if sep and prefix.endswith("-jit") else backbone
    if weights is not None:
        out["weights"] = _abs(weights)
    if pool is not None:
        out["pool"] = pool
    if scales is not None:
        out["scales"] = [float(s) for s in scales]
    return out


def configure(
    name: Optional[str] = None,
    backbone: Optional[str] = None,
    weights: Optional[str] = None,
    head: Optional[str] = None,
    pool: Optional[str] = None,
    scales: Optional[Sequence[float]] = None,
    base: Optional[str] = None,
    extra: Optional[Dict[str, Any]] = None,
    fused_parts: Optional[list] = None,
) -> Tuple[str, Dict[str, Any]]:
    """(name, conf) for ``name`` with the common options put where that extractor keeps them.

    ``fused_parts`` replaces the default parts of ``fused`` (``cbir train`` uses :data:`HEAD_BASE_PARTS`).
    """
    load_all()
    name = name or DEFAULT_EXTRACTOR
    EXTRACTORS.get(name)  # unknown names fail here, listing the known ones
    popts = _pooled_opts(backbone, weights, pool, scales)
    conf: Dict[str, Any] = {}
    if name == "pooled":
        conf.update(popts)
    elif name == "fused":
        if popts or fused_parts is not None:
            from .fused import DEFAULT_PARTS

            parts = copy.deepcopy(fused_parts if fused_parts is not None else DEFAULT_PARTS)
            for p in parts:
                if p["name"] == "pooled":
                    p["conf"] = {**p.get("conf", {}), **popts}
            conf["parts"] = parts
    elif name == "hash":
        b = base or "fused"
        conf["base"] = b
        conf["base_conf"] = configure(b, backbone, weights, head, pool, scales)[1]
    elif name == "semantic":
        if head is None and backbone is not None:  # a classifier network: the softmax of its logits (seed 003)
            if pool is not None or scales is not None:
                raise CbirError("--extractor semantic with --backbone uses the classifier's softmax; drop --pool/--scales")
            conf.update({k: v for k, v in popts.items() if k in ("backbone", "weights")})
        elif head is None:
            raise CbirError("--extractor semantic needs --head FILE (train one with `cbir train`) or a classifier "
                            "--backbone (paddle-jit:PREFIX, or paddle:mobilenet_v2 / mobilenet_v2 with --weights)")
        else:
            conf["head"] = head
            if popts:
                raise CbirError("--extractor semantic takes its backbone from the head file; drop --backbone/--weights/--pool/--scales")
    elif popts and name != "vlad":
        raise CbirError(f"--extractor {name} has no backbone options")
    if head is not None and name != "semantic" and not (name == "hash" and base == "semantic"):
        raise CbirError("--head is only for --extractor semantic")
    if extra:
        conf.update(extra)
    return name, conf


__all__ = ["EXTRACTORS", "Extractor", "make_extractor", "configure", "names", "DEFAULT_EXTRACTOR"]
