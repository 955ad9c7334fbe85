"""The demo dataset: photos that ship inside scikit-image, each with transformed copies.

Every original and its copies form one group (label = the photo's name). The copies cover what an
instance-retrieval engine must survive: crop, rotation, scale, perspective, JPEG, blur, colour and
occlusion. Generation is deterministic (fixed seeds), needs no network, and writes
``root/images/*.jpg`` plus ``root/list.txt`` in the seed format (``path<TAB>label``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np

# skimage.data loaders whose files ship inside the scikit-image wheel (no download)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle", "hubble_deep_field", "retina",
          "immunohistochemistry", "camera", "coins", "moon", "page")

TRANSFORMS = ("crop", "rotation", "scale", "perspective", "jpeg", "blur", "colour", "occlusion")


def load_photo(name: str) -> np.ndarray:
    """One of :data:`PHOTOS` as an RGB ``uint8`` array (grey photos repeated to three channels)."""
    from skimage import data

    img = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(1e-9, float(img.max())))).astype(np.uint8)
    return np.ascontiguousarray(img)


def _crop(img, rng):
    h, w = img.shape[:2]
    f = rng.uniform(0.6, 0.75)
    ch, cw = int(h * f), int(w * f)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return img[y : y + ch, x : x + cw]


def _rotation(img, rng):
    import cv2

    h, w = img.shape[:2]
    a = rng.choice([-1, 1]) * rng.uniform(12, 25)
    M = cv2.getRotationMatrix2D((w / 2, h / 2), a, 1.0)
    return cv2.warpAffine(img, M, (w, h), borderMode=cv2.BORDER_REFLECT)


def _scale(img, rng):
    import cv2

    s = rng.uniform(0.4, 0.55)
    return cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)


def _perspective(img, rng):
    import cv2

    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    d = 0.12 * min(h, w)
    dst = (src + rng.uniform(-d, d, size=(4, 2))).astype(np.float32)
    H = cv2.getPerspectiveTransform(src, dst)
    return cv2.warpPerspective(img, H, (w, h), borderMode=cv2.BORDER_REFLECT)


def _jpeg(img, rng):
    import cv2

    ok, buf = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(8, 15))])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]


def _blur(img, rng):
    import cv2

    s = rng.uniform(2.0, 3.0)
    return cv2.GaussianBlur(img, (0, 0), s)


def _colour(img, rng):
    import cv2

    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(8, 20))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 1.3), 0, 255)
    out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float64)
    gamma = rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.3, 1.6)
    return np.clip(255.0 * (out / 255.0) ** gamma, 0, 255).astype(np.uint8)


def _occlusion(img, rng):
    out = img.copy()
    h, w = img.shape[:2]
    for _ in range(3):
        bh, bw = int(h * rng.uniform(0.15, 0.3)), int(w * rng.uniform(0.15, 0.3))
        y, x = rng.integers(0, h - bh), rng.integers(0, w - bw)
        out[y : y + bh, x : x + bw] = rng.integers(0, 256, size=3)
    return out


_FUNCS: Dict[str, Callable] = {
    "crop": _crop, "rotation": _rotation, "scale": _scale, "perspective": _perspective,
    "jpeg": _jpeg, "blur": _blur, "colour": _colour, "occlusion": _occlusion,
}


def make_demo_dataset(root: os.PathLike, photos: Tuple[str, ...] = PHOTOS, seed: int = 0) -> Path:
    """Write the demo dataset to ``root`` (images/ and list.txt); returns the list path.

    Files are written to a temporary folder first and moved into place, so an interrupted
    generation never leaves a half dataset.
    """
    import shutil

    from PIL import Image

    root = Path(root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    lines: List[str] = []
    for gi, name in enumerate(photos):
        img = load_photo(name)
        variants = [("original", img)]
        for ti, t in enumerate(TRANSFORMS):
            rng = np.random.default_rng([seed, gi, ti])
            variants.append((t, np.ascontiguousarray(_FUNCS[t](img, rng))))
        for t, v in variants:
            rel = f"images/{name}_{t}.jpg"
            Image.fromarray(v).save(tmp / rel, quality=92)
            lines.append(f"{rel}\t{name}")
    (tmp / "list.txt").write_text("# cbir demo dataset: scikit-image photos and transformed copies\n" + "\n".join(lines) + "\n")
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)
    return root / "list.txt"
