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

def unit_rows(x) -> np.ndarray:
    """Rows of ``x`` as float32 unit vectors."""
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def flat_index(x):
    """An exact cosine index (cbir's CosineIndex) over the rows of ``x``."""
    from cbir.index.faiss_index import CosineIndex

    ci = CosineIndex(x.shape[1])
    ci.add(x)
    return ci


def write_textured(path, seed: int) -> None:
    """Save :func:`textured` ``seed`` as an image file at ``path`` (its folders made)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(textured(seed)).save(path)


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


# ----------------------------------------------------------------------------- numeric parity
#
# Two computations of one quantity (torch vs onnxruntime, cbir vs the seed's Paddle code, batched vs one by one)
# never agree bit for bit in float32: summation order differs with kernels, CPU features and thread counts. A bound
# is therefore relative to the size of what is compared, and each call site says where its number comes from
# (measured noise x margin, and how far a real bug - wrong normalisation, swapped channels - lands above it).


def _f64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensors
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_diff(a, b, axis=None):
    """``||a - b|| / ||b||`` in float64: over everything (``axis=None``, one number) or per row (``axis=-1``)."""
    a, b = _f64(a), _f64(b)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    num = np.linalg.norm((a - b).reshape(-1) if axis is None else a - b, axis=None if axis is None else axis)
    den = np.linalg.norm(b.reshape(-1) if axis is None else b, axis=None if axis is None else axis)
    return num / np.maximum(den, np.finfo(np.float64).tiny)


def assert_close_rel(a, b, rel: float, what: str = "", axis=None) -> None:
    """``||a - b|| <= rel * ||b||`` (L2; per row with ``axis=-1``, e.g. one descriptor per row)."""
    r = np.atleast_1d(rel_diff(a, b, axis))
    worst = int(np.argmax(r))
    assert r[worst] <= rel, f"{what}: ||a-b||/||b|| = {r[worst]:.3g} > {rel:g}" + (f" (row {worst} of {len(r)})" if r.size > 1 else "")


def assert_cosine(a, b, min_cos: float, what: str = "") -> None:
    """Row-wise cosine similarity (float64) of ``a`` and ``b`` (N, D) at least ``min_cos``."""
    a, b = np.atleast_2d(_f64(a)), np.atleast_2d(_f64(b))
    assert a.shape == b.shape, f"{what}: shapes differ: {a.shape} vs {b.shape}"
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), np.finfo(np.float64).tiny)
    worst = int(np.argmin(cos))
    assert cos[worst] >= min_cos, f"{what}: cosine {cos[worst]:.9f} < {min_cos} (row {worst} of {len(cos)})"


def assert_close_scaled(a, b, rel: float, what: str = "", scale=None) -> None:
    """``max |a - b| <= rel * scale``, ``scale`` = ``max |b|`` unless given: for values whose size is their own unit
    (logits, heatmaps, probabilities, pixel coordinates: pass the image side as ``scale``)."""
    a, b = _f64(a), _f64(b)
    assert a.shape == b.shape, f"{what}: shapes differ: {a.shape} vs {b.shape}"
    if not a.size:
        return
    s = float(np.abs(b).max()) if scale is None else float(scale)
    d = float(np.abs(a - b).max())
    assert d <= rel * s, f"{what}: max |a-b| = {d:.3g} > {rel:g} x {s:.3g}"


def assert_unit_rows(x, what: str = "", tol: float = 1e-5) -> None:
    """Every row L2-normalised: ``| ||row|| - 1 | <= tol`` (float32 rounding of a D-term sum is ~sqrt(D) x 6e-8)."""
    n = np.linalg.norm(np.atleast_2d(_f64(x)), axis=1)
    assert n.size == 0 or np.abs(n - 1).max() <= tol, f"{what}: row norms in [{n.min():.7f}, {n.max():.7f}], not 1 +- {tol:g}"


def load_test_module(relpath: str, name: str):
    """Import ``tests/<relpath>`` as module ``name`` without touching ``sys.path`` (``sys.path.insert`` in one test
    changes what ``import conftest`` means in every later one); cached in ``sys.modules`` under ``name``."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "tests" / relpath)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class FakeIndex:
    """The parts of ``cbir.engine.Index`` a ``Reranker`` reads: ``folder`` (its local.h5), ``names``, ``paths`` and
    ``manifest["local"]``; for re-ranking tests that write the local features themselves."""

    def __init__(self, folder: Path, names, paths, local):
        self.folder, self.names, self.paths = folder, np.array(names, dtype=object), np.array(paths, dtype=object)
        self.manifest = {"local": local}
