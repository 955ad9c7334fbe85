"""Global descriptors, one module per kind, found by name in ``EXTRACTORS``.

``configure()`` turns the command line's common options (backbone, weights, head, pool, scales) into
the config of whichever extractor is asked for, so ``--extractor hash --backbone xfeat`` needs no
special cases in the CLI.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Sequence, Tuple

from ..errors import CbirError
from .base import EXTRACTORS, Extractor, Options, make_extractor

#: what `cbir index build` uses when no --extractor is given: ImageNet MobileNetV2's last block, average-pooled (1280-d),
#: at two scales (1 and 0.707, averaged: DEFAULT_CONF), chosen by benchmarks/suite.py over every collection (README
#: "Defaults"): with the default graph stage (alpha-QE 5 over DBA 7) its mean mAP over the suite is 0.951, single-scale
#: `pooled` 0.928 and `fused` (+ 0.1 HSV colour, the previous default) 0.929; colour helps corel1k only
DEFAULT_EXTRACTOR = "pooled"
#: the options the default extractor gets where none are given (`--extractor` not given, `build_index()` without one)
DEFAULT_CONF: Dict[str, Any] = {"scales": [1.0, 0.707]}

#: the fused parts a semantic head reads by default (`cbir train`): ImageNet MobileNetV2's last block,
#: average-pooled, + HSV colour. Measured (benchmarks/quality.py, head on corel1k's train split, test split):
#: P@10 0.981 (0.980 without colour, 0.974 with GeM over stage13+last; 0.904 for the previous ALIKED-n16 +
#: colour base). No VLAD parts: they over-fitted a linear head on the 500 training images (0.864 vs 0.907
#: with the ALIKED base) and would tie the head to a gallery codebook.
HEAD_BASE_PARTS = [
    {"name": "pooled", "conf": {"backbone": "mobilenet_v2"}, "weight": 1.0},
    {"name": "colour", "conf": {}, "weight": 1.0},
]

#: named configurations (hloc-style ``confs``): ``--extractor NAME`` picks an extractor with a whole conf; the index
#: records the extractor and the conf, not the name (a renamed or edited entry never changes a built index).
CONFS: Dict[str, Dict[str, Any]] = {
    # ImageNet MobileNetV2, last block average-pooled: the pooled part of the default `fused` (README "Descriptors":
    # corel1k P@10 0.970 / mAP 0.901); the same averaged over two scales (0.969 / 0.902); GeM p=3 (0.962 / 0.877)
    "mnv2-gap": {"extractor": "pooled", "conf": {"backbone": "mobilenet_v2", "pool": "gap"}},
    "mnv2-gap-ms": {"extractor": "pooled", "conf": {"backbone": "mobilenet_v2", "pool": "gap", "scales": [1.0, 0.707]}},
    "mnv2-gem": {"extractor": "pooled", "conf": {"backbone": "mobilenet_v2", "pool": "gem"}},
    # ALIKED-n16's feature maps, GeM: a weak global ranking that re-ranking has to repair (issue 13's bar)
    "aliked-gem": {"extractor": "pooled", "conf": {"backbone": "aliked-n16"}},
    # 1,280-bit mean-hash codes of mnv2-gap
    "mnv2-hash": {"extractor": "hash", "conf": {"base": "pooled", "base_conf": {"backbone": "mobilenet_v2", "pool": "gap"}}},
}


def names():
    """The extractors and the named configurations of :data:`CONFS`."""
    return EXTRACTORS.names() + sorted(CONFS)


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
    """(name, conf) for ``name`` with the common options put where that extractor keeps them (each kind's
    :meth:`~cbir.extractors.base.Extractor.conf_from_options`), then a named conf's or the caller's ``extra`` keys.

    ``name`` is an extractor (``pooled``, ``fused``, ...) or a named conf of :data:`CONFS` (``mnv2-gem``, ...).
    ``fused_parts`` replaces the default parts of ``fused`` (``cbir train`` uses :data:`HEAD_BASE_PARTS`).
    """
    if name is None:  # the default pipeline's descriptor: DEFAULT_CONF under the options given
        name, conf = configure(DEFAULT_EXTRACTOR, backbone, weights, head, pool, scales, base, extra, fused_parts)
        if conf.get("backbone") in (None, "mobilenet_v2"):
            conf = {**copy.deepcopy(DEFAULT_CONF), **conf}
        return name, conf
    named = CONFS.get(name)
    if named is not None:
        given = [f"--{k}" for k, v in (("backbone", backbone), ("weights", weights), ("head", head), ("pool", pool), ("scales", scales),
                                      ("base", base)) if v is not None]
        if given:
            raise CbirError(f"--extractor {name} is a named configuration ({named['extractor']} with {named['conf']}); drop "
                            f"{', '.join(given)} or use --extractor {named['extractor']} with your options")
        return named["extractor"], {**copy.deepcopy(named["conf"]), **(extra or {})}
    if name not in EXTRACTORS:
        raise CbirError(f"unknown extractor {name!r}; choose one of: {', '.join(names())}")
    cls = EXTRACTORS.get(name)
    if head is not None and name != "semantic" and not (name == "hash" and base == "semantic"):
        raise CbirError("--head is only for --extractor semantic")
    if base is not None and name != "hash":
        raise CbirError("--base is only for --extractor hash")
    conf = cls.conf_from_options(Options(backbone, weights, head, pool, scales, base, fused_parts))
    conf.update(extra or {})
    return name, conf


__all__ = ["EXTRACTORS", "Extractor", "Options", "make_extractor", "configure", "names", "DEFAULT_EXTRACTOR", "DEFAULT_CONF", "CONFS"]
