import os

import numpy as np
import pytest

from helpers import textured

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture()
def small_set(tmp_path):
    """3 groups x 4 images (a base image and 3 mild variants), written as JPEG with a seed-format list."""
    from PIL import Image

    d = tmp_path / "set"
    (d / "img").mkdir(parents=True)
    lines = []
    for g in range(3):
        base = textured(100 + g)
        for v in range(4):
            img = base.copy()
            if v == 1:
                img = img[:, ::-1].copy()
            elif v == 2:
                img = np.clip(img.astype(int) + 20, 0, 255).astype(np.uint8)
            elif v == 3:
                img = img[4:-4, 6:-6].copy()
            name = f"img/g{g}_{v}.jpg"
            Image.fromarray(img).save(d / name, quality=95)
            lines.append(f"{name}\tgroup{g}")
    (d / "list.txt").write_text("\n".join(lines) + "\n")
    return d
