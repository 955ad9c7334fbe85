"""Fixtures of the local-feature tests: shared data (skipped when absent), synthetic textured images and pairs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy 2-core machines: see ../shared/DESIGN.md, "Threads on a busy 2-core machine"

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
GRAF = SHARED_DATA / "matching_oxford_affine_graf"


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch
    except ImportError:  # pragma: no cover
        return
    old = torch.get_num_threads()
    torch.set_num_threads(min(2, old))
    yield
    torch.set_num_threads(old)


def textured_image(h: int = 360, w: int = 480, seed: int = 0) -> np.ndarray:
    """An RGB image with blobs, rectangles and lines at several scales: plenty of corners for every detector."""
    import cv2

    rng = np.random.default_rng(seed)
    img = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    for _ in range(60):
        c = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.circle(img, (x, y), int(rng.integers(4, 30)), c, -1)
        elif kind == 1:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(8, 60)), y + int(rng.integers(8, 60))), c, -1)
        else:
            cv2.line(img, (x, y), (int(rng.integers(0, w)), int(rng.integers(0, h))), c, int(rng.integers(1, 4)))
    return cv2.GaussianBlur(img, (3, 3), 0)


def warp_pair(img: np.ndarray):
    """``img`` and a copy warped by a known mild homography ``H`` (image 0 -> image 1)."""
    import cv2

    h, w = img.shape[:2]
    c, s = np.cos(np.deg2rad(8)), np.sin(np.deg2rad(8))
    A = np.array([[0.92 * c, -0.92 * s, 0], [0.92 * s, 0.92 * c, 0], [0, 0, 1]])
    T0 = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    T1 = np.array([[1, 0, w / 2 + 6], [0, 1, h / 2 - 4], [0, 0, 1]])
    P = np.array([[1, 0, 0], [0, 1, 0], [2e-4, -1e-4, 1]])
    H = T1 @ P @ A @ T0
    H = H / H[2, 2]
    warped = cv2.warpPerspective(img, H, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return img, warped, H


@pytest.fixture(scope="session")
def textured():
    return textured_image()


@pytest.fixture(scope="session")
def other_textured():
    """A texture unrelated to :func:`textured` (a negative for re-ranking)."""
    return textured_image(seed=7)


@pytest.fixture(scope="session")
def warped_pair(textured):
    return warp_pair(textured)


@pytest.fixture(scope="session")
def graf():
    """``(img1, imgK loader, H loader)`` of the Oxford graf sequence; skips when ../shared is absent."""
    if not (GRAF / "img1.png").is_file():
        pytest.skip(f"shared data not found at {GRAF}")
    from cbir.data import decode_image

    return {
        "dir": GRAF,
        "img": lambda k: decode_image(GRAF / f"img{k}.png"),
        "H": lambda k: np.loadtxt(GRAF / f"H1to{k}p"),
    }


@pytest.fixture(scope="session")
def real_image():
    """A real photo (graf img1, shrunk) when shared data exists, else the synthetic texture."""
    from cbir.data import decode_image

    if (GRAF / "img1.png").is_file():
        return decode_image(GRAF / "img1.png", max_side=480)
    return textured_image()
