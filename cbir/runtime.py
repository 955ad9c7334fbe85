"""The ``runtime`` switch (``torch`` | ``onnx``): the bottom floor every network asks which runtime to use, and
the CPU threads both runtimes (and OpenCV, faiss) get.

Which runtime a network uses: its conf key ``runtime`` when set, else the process default, which is
``$CBIR_RUNTIME`` or ``torch`` until :func:`set_default_runtime` (the CLI's ``--runtime``) changes it. The runtime
is never part of an extractor's identity: an index built with one runtime is queried with the other. In-process
callers that switch it for a while (the CLI's ``main``, tests, notebooks) use ``with using(name):``, which puts back
what was there before.

The onnxruntime implementations (export on first use, cached sessions, the code that runs around each graph) live
in :mod:`cbir.export.runtime`, a floor above the extractors and matchers. They register themselves here by name
(:func:`register_runner`); a network whose runtime is ``onnx`` calls ``runner("pooled")(ext, images)`` and never
imports the export floor, so no module below ``cbir.export`` depends on it.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import numpy as np

from .errors import CbirError

RUNTIMES = ("torch", "onnx")
#: modules that register onnx runners when imported (plugins, found by name)
RUNNER_MODULES = ("cbir.export.runtime",)
_DEFAULT: Optional[str] = None
_RUNNERS: Dict[str, Callable] = {}
_LOCK = threading.Lock()


def _check(name: str) -> str:
    name = str(name).lower()
    if name not in RUNTIMES:
        raise CbirError(f"unknown runtime {name!r}; choose one of: {', '.join(RUNTIMES)}")
    return name


def default_runtime() -> str:
    """The process default: :func:`set_default_runtime`'s value, else ``$CBIR_RUNTIME``, else ``torch``."""
    return _check(_DEFAULT or os.environ.get("CBIR_RUNTIME") or "torch")


def set_default_runtime(name: Optional[str]) -> None:
    """Set the process default (``None``: back to ``$CBIR_RUNTIME`` / ``torch``); ``onnx`` checks onnxruntime now."""
    global _DEFAULT
    _DEFAULT = None if name is None else _check(name)
    if _DEFAULT == "onnx":
        require_onnxruntime()


@contextlib.contextmanager
def using(name: Optional[str]) -> Iterator[str]:
    """``with using("onnx"):`` the process default is ``name`` inside the block (``None``: ``$CBIR_RUNTIME`` /
    ``torch``) and what it was before afterwards, also when the block raises or ``name`` is refused."""
    global _DEFAULT
    before = _DEFAULT
    try:
        set_default_runtime(name)
        yield default_runtime()
    finally:
        _DEFAULT = before


def resolve_runtime(value: Optional[str] = None) -> str:
    """The runtime a component uses: its own ``value`` when set, else the process default."""
    return _check(value) if value else default_runtime()


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise CbirError("--runtime onnx needs onnxruntime (and onnx to export): pip install 'cbir[onnx]'") from None
    return onnxruntime


def torch_threads() -> int:
    """The threads torch computes with now (what :func:`set_threads` set); onnxruntime sessions get as many."""
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return max(1, min(4, os.cpu_count() or 1))


#: glibc's malloc serves blocks up to this size from its heap and keeps freed ones for reuse (its default, 128 KiB
#: growing to 32 MiB, maps and unmaps larger ones each time). A network allocates and frees its activations on every
#: forward: mapped afresh, each costs page faults on zeroed pages. Measured (300 corel1k photos, MobileNetV2 at both
#: scales, 2 threads): forward 5.5 s -> 3.3 s, system time 3.2 s -> 0.02 s, peak RSS 1,213 -> 1,240 MiB.
HEAP_BLOCK_MAX = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_HEAP_KEPT: Optional[bool] = None


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks up to :data:`HEAP_BLOCK_MAX` for reuse (``mallopt``), once per process;
    True when it does. Not on other platforms or C libraries, nor when ``$MALLOC_MMAP_THRESHOLD_`` /
    ``$MALLOC_TRIM_THRESHOLD_`` (the user's own glibc tuning) or ``CBIR_MALLOC=system`` are set."""
    global _HEAP_KEPT
    if _HEAP_KEPT is None:
        _HEAP_KEPT = False
        own = any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        if sys.platform.startswith("linux") and not own and os.environ.get("CBIR_MALLOC", "") != "system":
            try:
                mallopt = ctypes.CDLL(None).mallopt
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                _HEAP_KEPT = mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_MAX) == 1 and mallopt(_M_TRIM_THRESHOLD, HEAP_BLOCK_MAX) == 1
            except (OSError, AttributeError):  # no mallopt (musl, static builds)
                pass
    return _HEAP_KEPT


def set_threads(n: int) -> None:
    """Threads for torch, OpenCV and faiss (and :func:`keep_freed_memory`). Call before heavy work; OMP_WAIT_POLICY
    must be set before import."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    keep_freed_memory()
    import torch

    torch.set_num_threads(max(1, n))
    try:
        import cv2

        cv2.setNumThreads(max(1, n))
    except ImportError:  # pragma: no cover
        pass
    try:
        import faiss

        faiss.omp_set_num_threads(max(1, n))
    except ImportError:  # pragma: no cover
        pass


class Session:
    """An onnxruntime CPU session: ``run({input: array}) -> [arrays]`` in the graph's output order."""

    def __init__(self, path, threads: int = 0, spinning: bool = False) -> None:
        ort = require_onnxruntime()
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads) or torch_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if not spinning:  # idle threads sleep: on a busy machine spinning ones steal the cores (README "Threads")
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        try:
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types
            raise CbirError(f"{path}: onnxruntime cannot load the model ({e})") from None
        self.input_names = [i.name for i in self.sess.get_inputs()]
        self.output_names = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: Dict[str, Any]) -> List[np.ndarray]:
        feeds = {k: np.ascontiguousarray(_np(v)) for k, v in feeds.items()}
        return self.sess.run(None, feeds)


def _np(x):
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def register_runner(name: str, fn: Callable) -> None:
    """Make ``fn`` the onnxruntime implementation called ``name`` (e.g. ``pooled``, ``aliked``, ``lightglue``)."""
    _RUNNERS[name] = fn


def runner(name: str) -> Callable:
    """The onnxruntime implementation ``name``; the modules of :data:`RUNNER_MODULES` are loaded on first use."""
    fn = _RUNNERS.get(name)
    if fn is None:
        with _LOCK:
            for mod in RUNNER_MODULES:
                importlib.import_module(mod)
        fn = _RUNNERS.get(name)
    if fn is None:
        raise CbirError(f"no onnxruntime implementation named {name!r} (known: {', '.join(sorted(_RUNNERS)) or 'none'})")
    return fn
