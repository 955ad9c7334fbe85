"""The pipeline as a Python API, one door for the CLI and the service: build an index, load it, query it, update
it, evaluate it, train a semantic head.

    file list -> decode -> global extractor -> index -> ranked candidates -> (re-rank) -> evaluator

Each stage is its own module; this one only gathers them:

    cbir/build.py               build_index (one function per phase: work folder, learned state, reuse, extract, write)
    cbir/query.py               Index (an index folder + its extractor), load_index, verify_index
    cbir/update.py              add_images, remove_images, compact_index
    cbir/eval/evaluate.py       evaluate
    cbir/extractors/train.py    train_head
"""

from __future__ import annotations

from .build import FINAL_CHUNK_BYTES, LOCAL_DEFAULTS, BuildReport, build_index, resolve_extractor, shrink  # noqa: F401
from .data import dedupe  # noqa: F401
from .eval.evaluate import evaluate  # noqa: F401
from .extractors.train import train_head  # noqa: F401
from .index.manifest import STATE_FILE  # noqa: F401
from .index.rows import load_state_file, save_state  # noqa: F401
from .query import Index, load_index, verify_index  # noqa: F401
from .update import UpdateReport, add_images, compact_index, remove_images  # noqa: F401

__all__ = ["build_index", "BuildReport", "Index", "load_index", "verify_index", "add_images", "remove_images", "compact_index",
           "UpdateReport", "evaluate", "train_head", "resolve_extractor"]
