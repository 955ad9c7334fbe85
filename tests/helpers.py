"""Helpers shared by the tests (importable: setup.cfg puts tests/ on the path)."""

import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


def shared(name: str) -> Path:
    """A dataset folder of ../shared/data, or skip the test cleanly when it is absent."""
    p = SHARED_DATA / name
    if not p.is_dir():
        pytest.skip(f"{p} not present (../shared/data is only beside the repo in CI and on dev machines)")
    return p

def textured(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A random colourful image with blobs and edges (distinct per seed)."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    for _ in range(12):
        c = tuple(int(x) for x in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(4, 20)), c, -1)
        else:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(5, 30)), y + int(rng.integers(5, 30))), c, -1)
    return img
