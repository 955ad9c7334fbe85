"""An index folder opened for search: manifest, row metadata, stored vectors and the search backend.

This is the index floor's read side: it knows the folder's layout (:mod:`cbir.index.manifest`, :mod:`cbir.index.rows`) and the backends
(:mod:`cbir.index.backend`), not the extractors. :class:`cbir.query.Index` adds the extractor that describes queries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from ..errors import CbirError, IndexMismatch
from .folder import read_manifest
from .manifest import FEATURES, MANIFEST
from .rows import read_rows
from .verify import check_sizes, damaged, open_checked, verify_file
from .backend import FaissBackend, SearchSpec
from .faiss_index import CosineIndex, HammingIndex

PathLike = Union[str, os.PathLike]

#: opens of a folder an update replaced meanwhile before giving up (each replacement is a new manifest file)
OPEN_TRIES = 5


def _stamp(folder: Path) -> Optional[Tuple[int, int, int]]:
    """What tells one version of an index folder from the next: its manifest file's inode, mtime and size."""
    try:
        st = os.stat(folder / MANIFEST)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def check_shapes(folder: PathLike, m: Dict[str, Any], shapes: Optional[Dict[str, Any]] = None) -> None:
    """The datasets of features.h5 have the shapes the manifest implies (count x dim...): a manifest claiming more
    rows or wider ones than the file holds is damage, named before anything is allocated from it. ``shapes``: those
    of rows already read; else the file's own, read without a byte of data."""
    if shapes is None:
        import h5py

        def opener(p):
            with h5py.File(p, "r") as f:
                return {k: f[k].shape for k in f if isinstance(f[k], h5py.Dataset)}

        shapes = open_checked(folder, FEATURES, m, opener, verify=False)
    n = m["count"]
    width = m["code_bits"] // 8 if m["metric"] == "hamming" else m["dim"]
    for key, shape in (("names", (n,)), ("paths", (n,)), ("labels", (n,)), ("descriptors", (n, m["dim"])),
                       *((("codes", (n, width)),) if m["metric"] == "hamming" else ())):
        got = shapes.get(key)
        if got != shape:
            raise damaged(folder, FEATURES, f"dataset {key!r} has shape {got}, the manifest implies {shape}", m)


class Gallery:
    """A built index folder: manifest, row metadata (names, paths, labels, ids), descriptors and the search backend."""

    def __init__(self, folder: PathLike, verify: bool = True, mmap: bool = False) -> None:
        """Open ``folder``: every file the manifest records must be there with its size, and those read here are
        checked against their SHA-256 first (``verify``), so a damaged index is a one-line error naming the file, never
        silently wrong rankings. One version of the folder is opened: a folder replaced by an update meanwhile is
        opened again, and the files read later (k-NN graph, learned state, local features) are held open now
        (:meth:`open_file`), so a query answers from the old index or the new one, never a mix."""
        self.folder = Path(folder)
        self._held: Dict[str, int] = {}
        for attempt in range(OPEN_TRIES):
            before = _stamp(self.folder)
            try:
                self._open(verify, mmap)
            except CbirError:
                self._release()
                if attempt + 1 == OPEN_TRIES or _stamp(self.folder) == before:
                    raise  # damage, not a replacement
                continue
            if _stamp(self.folder) == before:
                return
            self._release()  # replaced while it was read: what was read may mix two versions
        raise CbirError(f"{self.folder}: replaced by updates {OPEN_TRIES} times while it was being opened; try again")

    def _open(self, verify: bool, mmap: bool) -> None:
        self.manifest = m = read_manifest(self.folder)
        check_sizes(self.folder, m)
        self._hold(m)
        self._paths_resolved: Optional[Dict[str, int]] = None
        self.metric = m["metric"]
        rows = open_checked(self.folder, FEATURES, m, lambda p: read_rows(p, lazy=("descriptors", "codes", "raw"))[0], verify)
        n = m["count"]
        check_shapes(self.folder, m, {k: getattr(v, "shape", None) for k, v in rows.items()})
        self.names: np.ndarray = rows["names"]
        self.paths: np.ndarray = rows["paths"]
        self.labels: np.ndarray = np.array([l if l != "" else None for l in rows["labels"]], dtype=object)
        self._descriptors = rows["descriptors"]  # rows.LazyRows: read when used (see there)
        self._codes = rows.get("codes")
        self.ids: np.ndarray = np.asarray(rows["ids"], np.int64) if "ids" in rows else np.arange(n, dtype=np.int64)
        if len(self.ids) != n or (n > 1 and not (np.diff(self.ids) > 0).all()):
            raise damaged(self.folder, FEATURES, "image ids are not one increasing id per row", m)
        if "search" in m:
            try:
                spec = SearchSpec.from_json(m["search"])
            except (CbirError, TypeError, ValueError) as e:
                raise damaged(self.folder, MANIFEST, f"invalid search spec: {e}", m) from None
            if m.get("store"):  # vectors in a Milvus collection; the folder holds its pointer file
                from .milvus import MilvusBackend

                verify_file(self.folder, m["faiss"], m, full=verify)
                self.index = MilvusBackend.open(self.folder / m["faiss"], spec)  # a server or lock problem says so itself
            else:
                self.index = open_checked(self.folder, m["faiss"], m, lambda p: FaissBackend.open(p, spec, mmap=mmap), verify)
        elif self.metric == "hamming":  # an index written before ids and codecs (flat, row = id)
            self.index = open_checked(self.folder, m["faiss"], m, HammingIndex.load, verify)
        else:
            self.index = open_checked(self.folder, m["faiss"], m, lambda p: CosineIndex.load(p, ann=m["ann"]), verify)
        if self.index.ntotal != n or self.index.dim != (m["code_bits"] if self.metric == "hamming" else m["dim"]):
            raise damaged(self.folder, m["faiss"], f"holds {self.index.ntotal} vectors of dimension {self.index.dim}, "
                                f"the manifest {n} of {m['code_bits'] if self.metric == 'hamming' else m['dim']}", m)
        self._verify = verify
        self._pos = {n: i for i, n in enumerate(self.names)}

    def _hold(self, m: Dict[str, Any]) -> None:
        """Open (and keep open) the files read after the folder is opened, so an update replacing the folder meanwhile
        does not change what this index reads."""
        for name in sorted(m.get("files") or {}):
            if name in (FEATURES, m["faiss"], MANIFEST):
                continue
            try:
                self._held[name] = os.open(self.folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except OSError:
                pass  # named by verify_file when it is needed

    def _release(self) -> None:
        held, self._held = getattr(self, "_held", {}), {}
        for fd in held.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self._release()

    def open_file(self, name: str, opener):
        """``opener(file)`` of index file ``name`` of the index as it was opened, checked against the manifest first
        (:func:`cbir.index.verify.open_checked`; errors name ``folder/name``). ``file``: the descriptor held since the
        open (Linux; a file object: ``opener`` reads what it needs before returning), so an update that replaced the
        folder meanwhile changes nothing; elsewhere the path."""
        fd = self._held.get(name)
        if fd is None or not os.path.isdir("/proc/self/fd"):
            return open_checked(self.folder, name, self.manifest, opener, self._verify)
        with os.fdopen(os.dup(fd), "rb") as f:  # this version's file, whatever the folder holds now
            return open_checked(self.folder, name, self.manifest, lambda _: opener(f), self._verify, path=f"/proc/self/fd/{fd}")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def extractor_name(self) -> str:
        return self.manifest["extractor"]["name"]

    def check_extractor(self, name: Optional[str]) -> None:
        if name and name != self.extractor_name:
            raise IndexMismatch(
                f"{self.folder} was built with extractor {self.extractor_name!r}; a query with {name!r} cannot be compared. "
                f"Drop --extractor or rebuild the index with --extractor {name}"
            )

    def row(self, name: str) -> Optional[int]:
        return self._pos.get(name)

    @property
    def descriptors(self) -> np.ndarray:
        """Every row's final float descriptor, ``(N, dim)``: read from features.h5 on first use (opening reads none)."""
        return np.asarray(self._descriptors)

    @property
    def codes(self) -> Optional[np.ndarray]:
        """Every row's packed binary code (Hamming indexes), read on first use like :attr:`descriptors`."""
        return None if self._codes is None else np.asarray(self._codes)

    def descriptor_rows(self, rows: np.ndarray) -> np.ndarray:
        """The final float descriptors of some gallery rows, reading only those."""
        return self._descriptors[np.asarray(rows, np.int64)]

    def query_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored index-side vectors of gallery rows (codes for a Hamming index), reading only those."""
        rows = np.asarray(rows, np.int64)
        return self._codes[rows] if self.metric == "hamming" else self._descriptors[rows]

    def search(self, vectors: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` gallery rows per query (``-1`` where fewer), best first; ``exclude[i]``: a row left out of query i."""
        ex = None
        if exclude is not None:
            exclude = np.asarray(exclude)
            ex = np.where(exclude >= 0, self.ids[np.maximum(exclude, 0)], -1)
        scores, ids = self.index.search(vectors, k, exclude=ex)
        if len(self.ids) == 0:
            return scores, np.full_like(ids, -1)
        rows = np.searchsorted(self.ids, np.maximum(ids, 0))
        rows = np.minimum(rows, len(self.ids) - 1)
        return scores, np.where((ids >= 0) & (self.ids[rows] == ids), rows, -1)

    def stored_knn(self, k: int) -> Optional[Tuple[np.ndarray, np.ndarray]]:
        """(sims, rows) of the k-NN graph stored with the index (knn.h5, checked like every file) when it holds at
        least ``k`` neighbours per image; None otherwise (the graph stage then computes it)."""
        from . import knn

        rec = self.manifest.get("knn")
        if not isinstance(rec, dict) or int(rec.get("k") or 0) < int(k):
            return None
        nbr, sims = self.open_file(knn.GRAPH_FILE, lambda p: knn.read(p, len(self)))
        return knn.as_rows(nbr, sims, self.ids)

    def searcher(self, expand: Any = "index"):
        """The search stage with the graph stage ``expand`` (cbir/index/expansion.py: ``"index"``, the one this index
        records; None: plain top-k; or a spec dict), a callable like :meth:`search` with ``describe()``."""
        from .expansion import searcher

        return searcher(self, expand)

    def set_search(self, nprobe: Optional[int] = None, ef: Optional[int] = None) -> None:
        """Query-time recall/speed of an IVF (``nprobe``) or HNSW (``ef``) index."""
        if hasattr(self.index, "set_search"):
            self.index.set_search(nprobe=nprobe, ef=ef)

    def row_of_path(self, p: PathLike) -> Optional[int]:
        """The gallery row of an image file (by its resolved path), None when the file is not in the gallery."""
        if self._paths_resolved is None:
            self._paths_resolved = {}
            for i, q in enumerate(self.paths):
                self._paths_resolved.setdefault(str(q), i)
        return self._paths_resolved.get(str(Path(p).resolve()))

    def result(self, i: int, score: float, rank: int) -> Dict[str, Any]:
        label = self.labels[i]
        names = self.manifest.get("label_names") or {}
        return {"rank": rank, "name": str(self.names[i]), "path": str(self.paths[i]), "label": label,
                "label_name": names.get(label, label) if label is not None else None, "score": round(score, 6)}
