"""Helpers of the service tests (imported as ``serve.support``: setup.cfg puts tests/ on the path)."""

import threading
import time
from pathlib import Path

import numpy as np

from helpers import textured

GROUPS = 4
#: the first image of each group is its base; then a mirrored copy and a brighter one (colour histograms: near equal)
VARIANTS = ("base", "flip", "bright")


def _base(g: int) -> np.ndarray:
    """A 240x320 image of group ``g``: its own colours (for the colour index) and many small corners (for SIFT)."""
    import cv2

    img = textured(200 + g, h=240, w=320)
    rng = np.random.default_rng(300 + g)
    for _ in range(160):
        c = tuple(int(x) for x in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, 316)), int(rng.integers(0, 236))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(2, 7)), y + int(rng.integers(2, 7))), c, -1)
    return img


def variant(g: int, v: str) -> np.ndarray:
    img = _base(g)
    if v == "flip":
        img = img[:, ::-1].copy()
    elif v == "bright":
        img = np.clip(img.astype(int) + 12, 0, 255).astype(np.uint8)
    elif v == "crop":  # a query, not in the gallery
        img = img[20:-20, 24:-24].copy()
    return img


def write_gallery(folder: Path, groups=range(GROUPS)):
    from PIL import Image

    from cbir.data import Entry

    (folder / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for g in groups:
        for v in VARIANTS:
            name = f"img/g{g}_{v}.jpg"
            Image.fromarray(variant(g, v)).save(folder / name, quality=95)
            entries.append(Entry(name, folder / name, f"group{g}"))
    return entries


def build(entries, out: Path) -> Path:
    from cbir.engine import build_index

    build_index(entries, out, extractor="colour", progress=False, workers=0, log=lambda m: None)
    return out


def query_bytes(g: int, v: str = "crop", fmt: str = "JPEG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(variant(g, v)).save(buf, format=fmt)
    return buf.getvalue()


def make_config(folder, **kw):
    from cbir.serve.app import ServeConfig

    kw.setdefault("warm", False)
    kw.setdefault("match_features", "sift")
    kw.setdefault("match_matcher", "mnn")
    kw.setdefault("reload_s", 0)
    return ServeConfig(indexes={"t": str(folder)}, **kw)


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 (a free port); stops at teardown, or by itself after ``limit_s``."""

    def __init__(self, app, limit_s: float = 240.0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="test-live-server", daemon=True)
        self.timer = threading.Timer(limit_s, self.stop)
        self.timer.daemon = True

    def start(self) -> "LiveServer":
        self.thread.start()
        self.timer.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 60:
                raise RuntimeError("the test server did not start within 60 s")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True

    def join(self) -> None:
        self.stop()
        self.timer.cancel()
        self.thread.join(timeout=30)
