"""Session-wide set-up every test can rely on, whatever ran before it (order, earlier tests, the user's environment).

* torch at 2 threads (``$CBIR_TEST_THREADS``), restored after any test that changes it (``cbir.cli.main`` applies its ``--threads`` default,
  ``min(4, cores)``, to the whole process: after one CLI test every later test would run at that count);
* ``$CBIR_ONNX_CACHE`` in this session's tmp folder: no test reads an export another run left in ``~/.cache/cbir``;
* ``$CBIR_RUNTIME`` unset: a user's ``CBIR_RUNTIME=onnx`` would otherwise move every network to onnxruntime;
* before every test: the global RNGs (random, numpy, torch) seeded, so unseeded draws do not depend on test order;
* after every test: the environment, ``sys.path``, the runtime default and the thread counts as they were before it.
"""

import os
import random
import sys

import numpy as np
import pytest

from helpers import textured

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_addoption(parser):
    parser.addoption("--run-long", action="store_true", default=False,
                     help="also run the tests marked `long` (reliability cases of minutes; benchmarks/reliability.py passes it)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-long"):
        return
    skip = pytest.mark.skip(reason="a long reliability case: run with --run-long, or benchmarks/reliability.py")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)

#: torch threads of the suite: the busy 2-core machines it is measured on (../shared/DESIGN.md, "Threads on a busy 2-core machine");
#: CBIR_TEST_THREADS=1 (or 4) checks that no result depends on it
TEST_THREADS = int(os.environ.get("CBIR_TEST_THREADS") or 2)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(TEST_THREADS)


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """One export cache for the whole session (each model is exported once), removed with the tmp folder."""
    d = tmp_path_factory.mktemp("onnx_cache")
    saved = {k: os.environ.get(k) for k in ("CBIR_ONNX_CACHE", "CBIR_RUNTIME")}
    os.environ["CBIR_ONNX_CACHE"] = str(d)
    os.environ.pop("CBIR_RUNTIME", None)
    yield d
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _thread_counts():
    import torch

    counts = {"torch": torch.get_num_threads()}
    if "cv2" in sys.modules:
        counts["cv2"] = sys.modules["cv2"].getNumThreads()
    if "faiss" in sys.modules:
        counts["faiss"] = sys.modules["faiss"].omp_get_max_threads()
    return counts


@pytest.fixture(autouse=True)
def _restore_process_state():
    """What a test (or the code it calls) changes for the whole process is put back after it."""
    import torch

    env, path, threads = dict(os.environ), list(sys.path), _thread_counts()
    # unseeded torch.randn / np.random in a test draw the same numbers whichever tests ran before it
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    from cbir.runtime import using

    with using(None):  # the runtime default: unset inside the test (as every test starts), what it was after it
        yield
    if dict(os.environ) != env:  # e.g. cbir.models.paddle sets FLAGS_enable_pir_api before a legacy jit load
        os.environ.clear()
        os.environ.update(env)
    sys.path[:] = path
    now = _thread_counts()
    if now.get("torch") != threads["torch"]:
        torch.set_num_threads(threads["torch"])
    if "cv2" in threads and now.get("cv2") != threads["cv2"]:
        sys.modules["cv2"].setNumThreads(threads["cv2"])
    if "faiss" in threads and now.get("faiss") != threads["faiss"]:
        sys.modules["faiss"].omp_set_num_threads(threads["faiss"])


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


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """The demo set's images (12 photos x 9 copies), generated once per session into its tmp folder: a fresh clone
    has no indexes/_datasets/demo, and no test reads what `make demo` left there."""
    from cbir.demo import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "demo").parent / "images"
