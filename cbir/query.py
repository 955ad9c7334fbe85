"""The query stage: an index folder with the extractor that describes query images (:class:`Index`).

    idx = load_index("indexes/corel1k")
    hits = idx.query_images(["query.jpg"], top_k=10)
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CbirError, IndexMismatch, query_failed
from .extractors.base import Extractor, make_extractor
from .index import store
from .index.gallery import Gallery

PathLike = Union[str, os.PathLike]


class Index(Gallery):
    """A built index folder (see :class:`~cbir.index.gallery.Gallery`) with its extractor, exactly as at build."""

    def __init__(self, folder: PathLike, verify: bool = True, mmap: bool = False) -> None:
        super().__init__(folder, verify=verify, mmap=mmap)
        self._extractor: Optional[Extractor] = None

    def open_local(self):
        """``local.h5`` (re-ranking features), checked against the manifest like every index file."""
        from .local.store import LocalFeatureStore

        if not (self.folder / store.LOCAL_FILE).exists() and not self.manifest.get("local"):
            raise CbirError(f"{self.folder}: no local features (build the index with --local FEATURES to re-rank)")
        return store.open_checked(self.folder, store.LOCAL_FILE, self.manifest, lambda p: LocalFeatureStore(p, mode="r"), self._verify)

    @property
    def extractor(self) -> Extractor:
        """The extractor exactly as the gallery was described (config + learned state)."""
        if self._extractor is None:
            m = self.manifest
            ident = m["extractor"]
            conf = {}
            for k, v in ident["conf"].items():
                if v == f"@{k}":  # a file the index keeps a copy of (validated as a plain name by the manifest schema)
                    store.verify_file(self.folder, f"{k}.h5", m, self._verify)
                    v = str(self.folder / f"{k}.h5")
                conf[k] = v
            try:
                ext = make_extractor(ident["name"], conf)
            except CbirError as e:
                raise CbirError(f"{self.folder / store.MANIFEST}: its extractor cannot be made here ({e})") from None
            if ident.get("state") is not None or (self.folder / store.STATE_FILE).exists():
                arrays = store.open_checked(self.folder, store.STATE_FILE, m, store.load_state_file, self._verify)
                try:
                    ext.load_state(arrays)
                except (CbirError, KeyError, ValueError) as e:
                    raise store.damaged(self.folder, store.STATE_FILE, f"learned state does not load: {e}", m) from None
            try:
                dim = int(ext.dim)
            except CbirError as e:
                raise CbirError(f"{self.folder / store.MANIFEST}: its extractor cannot be made here ({e})") from None
            if dim != m["dim"]:  # checked before any descriptor is allocated from a (possibly hostile) conf
                raise store.damaged(self.folder, store.MANIFEST, f"the extractor conf implies {dim}-d descriptors, the index holds {m['dim']}-d", m)
            if ext.weights() != ident.get("weights", {}):
                raise IndexMismatch(
                    f"{self.folder}: the index was built with weights {ident.get('weights')} but this machine resolves {ext.weights()}; "
                    "queries would not be comparable"
                )
            self._extractor = ext
        return self._extractor

    def describe_images(self, images: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(final float descriptors, index-side vectors) of query images."""
        ext = self.extractor
        final = ext.describe(images)
        return final, (ext.encode(final) if self.metric == "hamming" else final)

    def query_images(self, paths: Sequence[PathLike], top_k: int = 10, exclude_self: bool = False,
                     failures: Optional[List[Dict[str, Any]]] = None,
                     expand: Any = "index") -> List[Dict[str, Any]]:
        """Rank the gallery for each image file; returns one dict per answered query with its ranked results.

        A query that cannot be answered (unreadable file, an image without a usable descriptor) raises its
        :class:`CbirError`, unless ``failures`` is a list: then ``{"path", "cause", "position"}`` (position: its index
        in ``paths``) is appended there and the other queries are still answered. Errors of the index itself
        (:class:`IndexMismatch`: extractor, weights, dimension) always raise.

        ``expand``: the graph stage (cbir/index/expansion.py): ``"index"`` (what the index records, the default),
        None (plain top-k) or ``{"qe_k", "alpha", "dba_k", "diffusion"}``.
        """
        from .data import decode_image

        if int(top_k) < 1:
            raise CbirError(f"top_k must be a positive number of results, got {top_k}")
        ext = self.extractor
        search = self.searcher(expand)
        out = []
        for pos, p in enumerate(paths):
            t0 = time.time()
            try:
                img = decode_image(p, max_side=ext.max_side)
                _, vec = self.describe_images([img])
                ex = None
                if exclude_self:
                    r = self.row_of_path(p)
                    ex = np.array([-1 if r is None else r])
                scores, ids = search(vec, top_k, exclude=ex)
            except CbirError as err:
                query_failed(failures, p, pos, err)
                continue
            r = self.row_of_path(p)
            out.append({
                "query": str(p),
                "query_label": None if r is None else self.labels[r],
                "seconds": round(time.time() - t0, 4),
                "results": [self.result(int(i), float(s), r + 1) for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0],
            })
        return out


def load_index(folder: PathLike) -> Index:
    return Index(folder)


def verify_index(folder: PathLike) -> Dict[str, Any]:
    """Check every file of an index against its manifest (size and SHA-256), then open it as a query would
    (shapes, faiss dimensions, the extractor with its learned state and weights, local features).

    Returns ``{"index", "ok", "files": [{"file", "bytes", "ok", "error"?}], "errors": [...]}``; a manifest that is
    missing or invalid raises, as there is nothing to check against.
    """
    folder = Path(folder)
    m = store.read_manifest(folder)
    files, errors = [], []
    recorded = m.get("files") or {}
    if not recorded:
        errors.append(f"{folder / store.MANIFEST}: records no checksums (built by an older cbir); rebuild the index to verify it")
    for name, rec in recorded.items():
        try:
            store.verify_file(folder, name, m, full=True)
            files.append({"file": name, "bytes": rec["bytes"], "ok": True})
        except CbirError as e:
            files.append({"file": name, "bytes": rec["bytes"], "ok": False, "error": str(e)})
            errors.append(str(e))
    extra = sorted(p.name for p in folder.iterdir() if p.name not in recorded and p.name != store.MANIFEST)
    if not errors:
        try:
            idx = Index(folder)
            idx.extractor  # noqa: B018 - builds the extractor: state, dimension and weights checked
            if m.get("local"):
                idx.open_local().close()
        except CbirError as e:
            errors.append(str(e))
    return {"index": str(folder), "ok": not errors, "count": m["count"], "files": files, "unrecorded": extra, "errors": errors}
