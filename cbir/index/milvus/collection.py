"""The backend: a gallery's vectors, ids, names and labels in one Milvus collection, with the interface of
:class:`cbir.index.backend.FaissBackend` (add, remove, search with exclusions and label filters, fetch, save a pointer)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ...errors import CbirError, IndexDamaged, IndexMismatch
from ..atomic import write_json_atomic
from ..backend import SearchSpec
from ..faiss_index import check_queries, l2_normalise, search_sizes
from .connection import COLLECTION_NAME, collection_exists, connect, error_text, is_lite, quiet, require_pymilvus
from .spec import check_spec, index_params

#: the pointer file a Milvus-backed index folder holds instead of a faiss file
POINTER_FILE = "milvus.json"
POINTER_FORMAT = "cbir-milvus/1"
#: Milvus' largest ``limit`` (top-k) per query
MAX_TOPK = 16384
#: bytes of vectors per insert request (Milvus' gRPC messages are capped at 64 MB)
INSERT_BYTES = 16 << 20
#: ids per delete / get request
ID_CHUNK = 1000
#: longest name / label stored (Milvus VARCHAR max_length)
MAX_TEXT = 65535
_ID, _VEC, _NAME, _LABEL = "id", "vector", "name", "label"


def _hits_arrays(hits) -> Tuple[np.ndarray, np.ndarray]:
    """(ids int64, distances float64) of one query's hits: pymilvus' column views, else hit by hit."""
    ids, dist = getattr(hits, "ids", None), getattr(hits, "distances", None)
    if ids is None or dist is None:
        ids = [h[_ID] if _ID in h else h["id"] for h in hits]
        dist = [h["distance"] for h in hits]
    return np.asarray(list(ids), np.int64).reshape(-1), np.asarray(list(dist), np.float64).reshape(-1)


def _escape(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _text(values: Optional[Sequence[Any]], n: int, what: str) -> List[str]:
    if values is None:
        return [""] * n
    out = ["" if v is None else str(v) for v in values]
    if len(out) != n:
        raise CbirError(f"{len(out)} {what}s for {n} vectors")
    for v in out:
        if len(v.encode("utf-8")) > MAX_TEXT:
            raise CbirError(f"a {what} of {len(v.encode('utf-8'))} bytes is longer than Milvus stores ({MAX_TEXT}): {v[:80]}...")
    return out


class MilvusBackend:
    """A gallery's search structure in a Milvus collection; ids are int64 image ids (the primary key).

    ``MilvusBackend(spec, uri, collection)`` makes a new, empty collection (``overwrite=True`` replaces one of that
    name); :meth:`open` reads an index folder's pointer file; :meth:`attach` takes an existing collection by name.
    """

    def __init__(self, spec: SearchSpec, uri: str, collection: str, overwrite: bool = False, token: Optional[str] = None,
                 _client=None, _create: bool = True) -> None:
        check_spec(spec, uri)
        if not COLLECTION_NAME.match(collection or ""):
            raise CbirError(f"invalid Milvus collection name {collection!r}: letters, digits and _, starting with a letter or _")
        self.spec = spec
        self.uri = uri
        self.collection = collection
        self.metric = spec.metric
        self.dim = int(spec.dim_in)
        self.lite = is_lite(uri)
        self._index = index_params(spec)
        self._client = _client if _client is not None else connect(uri, token)
        if _create:
            self._create(overwrite)
            self._count = 0
        else:
            self._count = self._query_count()

    # -- construction
    @classmethod
    def attach(cls, spec: SearchSpec, uri: str, collection: str, token: Optional[str] = None) -> "MilvusBackend":
        """An existing collection (its vector field checked against ``spec``)."""
        client = connect(uri, token)
        if not collection_exists(client, collection, uri):
            with contextlib.suppress(Exception), quiet():
                client.close()
            raise CbirError(f"{uri}: no Milvus collection {collection!r} (dropped, or another database?); rebuild the index")
        b = cls(spec, uri, collection, token=token, _client=client, _create=False)
        b._check_schema()
        b._load()
        return b

    @classmethod
    def open(cls, path: os.PathLike, spec: Optional[SearchSpec] = None, mmap: bool = False, token: Optional[str] = None) -> "MilvusBackend":
        """The collection an index folder's pointer file ``path`` names. ``spec`` (the manifest's) must describe the same
        vectors as the recorded one; its query-time settings (nprobe, ef) are used. ``mmap`` has no meaning here."""
        path = Path(path)
        try:
            rec = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(rec, dict) or rec.get("format") != POINTER_FORMAT:
                raise ValueError(f"not a {POINTER_FORMAT} pointer")
            uri, coll, recorded = str(rec["uri"]), str(rec["collection"]), SearchSpec.from_json(rec["spec"])
        except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, CbirError) as e:
            raise IndexDamaged(f"{path}: damaged Milvus pointer ({e}); rebuild the index") from None
        if spec is not None:
            for f in ("metric", "dim_in", "codec", "ann"):
                if getattr(spec, f) != getattr(recorded, f):
                    raise IndexDamaged(f"{path}: records {f}={getattr(recorded, f)!r} but the manifest {getattr(spec, f)!r}; rebuild the index")
        b = cls.attach(spec if spec is not None else recorded, uri, coll, token=token)
        return b

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            with quiet():
                return fn(*args, **kwargs)
        except CbirError:
            raise
        except Exception as e:  # noqa: BLE001 - pymilvus / grpc errors, one line with the collection named
            raise CbirError(f"Milvus {what} failed on {self.uri} (collection {self.collection}): {error_text(e)}") from None

    def _create(self, overwrite: bool) -> None:
        pm = require_pymilvus()
        c = self._client
        if collection_exists(c, self.collection, self.uri):
            if not overwrite:
                raise CbirError(f"{self.uri}: a Milvus collection {self.collection!r} exists already (pass overwrite to replace it)")
            self._call("drop_collection", c.drop_collection, self.collection)
        DT = pm.DataType
        schema = self._call("create_schema", pm.MilvusClient.create_schema, auto_id=False, enable_dynamic_field=False,
                            description="cbir gallery vectors")
        schema.add_field(_ID, DT.INT64, is_primary=True)
        if self.metric == "hamming":
            schema.add_field(_VEC, DT.BINARY_VECTOR, dim=self.dim)
        else:
            schema.add_field(_VEC, DT.FLOAT_VECTOR, dim=self.dim)
        schema.add_field(_NAME, DT.VARCHAR, max_length=MAX_TEXT)
        schema.add_field(_LABEL, DT.VARCHAR, max_length=MAX_TEXT)
        ip = c.prepare_index_params()
        ip.add_index(field_name=_VEC, index_type=self._index["index_type"], metric_type=self._index["metric_type"],
                     params=self._index["params"])
        self._call("create_collection", c.create_collection, self.collection, schema=schema, index_params=ip,
                   consistency_level="Strong")
        self._load()

    def _load(self) -> None:
        try:
            with quiet():
                self._client.load_collection(self.collection)
        except Exception as e:  # noqa: BLE001 - a server that cannot load it (memory) says why
            if not self.lite:
                raise CbirError(f"Milvus cannot load collection {self.collection} on {self.uri}: {error_text(e)}") from None

    def _check_schema(self) -> None:
        info = self._call("describe_collection", self._client.describe_collection, self.collection)
        fields = {f["name"]: f for f in info.get("fields", [])}
        vec = fields.get(_VEC)
        if vec is None or _ID not in fields:
            raise IndexMismatch(f"{self.uri}: collection {self.collection} is not a cbir gallery (fields {sorted(fields)})")
        dim = int((vec.get("params") or {}).get("dim", -1))
        if dim != self.dim:
            raise IndexMismatch(f"{self.uri}: collection {self.collection} holds {dim}-d vectors, the index {self.dim}-d")

    # -- the interface
    @property
    def is_trained(self) -> bool:
        return True  # Milvus learns IVF / PQ structures itself when it builds the index

    def train(self, sample: np.ndarray) -> None:
        """Nothing to learn client-side (Milvus trains IVF lists / PQ codebooks on the stored vectors)."""

    def _check(self, q: np.ndarray) -> None:
        check_queries(q, self.metric, self.dim)

    def _prep(self, x: np.ndarray, what: str = "descriptor"):
        if self.metric == "hamming":
            x = np.ascontiguousarray(x, dtype=np.uint8)
            return [bytes(r) for r in x]
        return l2_normalise(x, what)

    def add(self, ids: Sequence[int], vectors: np.ndarray, names: Optional[Sequence[str]] = None,
            labels: Optional[Sequence[Optional[str]]] = None) -> None:
        """Insert ``vectors`` under ``ids`` (new ids: Milvus does not merge duplicates), with names and labels (None: "")."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        vectors = np.asarray(vectors)
        if len(ids) != len(vectors):
            raise CbirError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(ids) == 0:
            return
        self._check(vectors)
        names_t, labels_t = _text(names, len(ids), "name"), _text(labels, len(ids), "label")
        row_bytes = vectors.shape[1] * (1 if self.metric == "hamming" else 4) + 64
        step = max(1, INSERT_BYTES // row_bytes)
        for a in range(0, len(ids), step):
            vec = self._prep(vectors[a : a + step])
            rows = [{_ID: int(i), _VEC: v, _NAME: n, _LABEL: l}
                    for i, v, n, l in zip(ids[a : a + step], vec, names_t[a : a + step], labels_t[a : a + step])]
            self._call("insert", self._client.insert, self.collection, rows)
            self._count += len(rows)

    def _existing(self, ids: np.ndarray) -> np.ndarray:
        found: List[int] = []
        for a in range(0, len(ids), ID_CHUNK):
            part = ids[a : a + ID_CHUNK].tolist()
            res = self._call("query", self._client.query, self.collection, filter=f"{_ID} in {part}", output_fields=[_ID])
            found += [int(r[_ID]) for r in res]
        return np.asarray(sorted(set(found)), np.int64)

    def remove(self, ids: Sequence[int]) -> int:
        """Delete ``ids``; returns how many were stored (ids not there are ignored)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if len(ids) == 0:
            return 0
        there = self._existing(ids)
        for a in range(0, len(there), ID_CHUNK):
            self._call("delete", self._client.delete, self.collection, filter=f"{_ID} in {there[a : a + ID_CHUNK].tolist()}")
        self._count -= len(there)
        return int(len(there))

    def _query_count(self) -> int:
        res = self._call("count", self._client.query, self.collection, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"]) if res else 0

    @property
    def ntotal(self) -> int:
        """Vectors stored (kept in step by add/remove; :meth:`refresh` asks Milvus again)."""
        return self._count

    def refresh(self) -> int:
        self._count = self._query_count()
        return self._count

    def set_search(self, nprobe: Optional[int] = None, ef: Optional[int] = None) -> None:
        """Query-time speed/recall: IVF lists visited (``nprobe``), HNSW candidates (``ef``)."""
        if nprobe is not None:
            self.spec.nprobe = int(nprobe)
        if ef is not None:
            self.spec.ef = int(ef)

    def _search_params(self, k: int) -> Dict[str, Any]:
        params: Dict[str, Any] = {}
        t = self._index["index_type"]
        if t.startswith("IVF") or t.startswith("BIN_IVF"):
            params["nprobe"] = int(max(1, min(self.spec.nprobe, self._index["params"].get("nlist", 1))))
        elif t.startswith("HNSW"):
            params["ef"] = int(max(self.spec.ef, k))
        return {"metric_type": self._index["metric_type"], "params": params}

    @staticmethod
    def label_filter(label: Union[None, str, Sequence[str]]) -> str:
        """The Milvus filter expression keeping images of ``label`` (a string, or any of a list of them)."""
        if label is None:
            return ""
        if isinstance(label, str):
            return f"{_LABEL} == {_escape(label)}"
        labels = list(label)
        if not labels:
            raise CbirError("an empty list of labels to filter on")
        return f"{_LABEL} in [{', '.join(_escape(l) for l in labels)}]"

    def search(self, queries: np.ndarray, k: int, exclude: Optional[np.ndarray] = None,
               label: Union[None, str, Sequence[str]] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` per query, best first: ``(scores float32 (nq, k), ids int64 (nq, k))``, ids ``-1`` where fewer exist.

        The convention of FaissBackend's :meth:`search`: scores are similarities (inner product of unit vectors, or
        ``1 - hamming / bits``), ``exclude[i]`` (an id or -1) is left out of query ``i``'s results, ``k`` is cut to the
        gallery size. ``label``: only images with that label (or one of those labels) are ranked.
        """
        queries = np.asarray(queries)
        self._check(queries)
        nq = len(queries)
        k, kk = search_sizes(k, self.ntotal, exclude)
        if k <= 0 or nq == 0:
            return np.zeros((nq, 0), np.float32), np.zeros((nq, 0), np.int64)
        if kk > MAX_TOPK:
            raise CbirError(f"Milvus returns at most {MAX_TOPK} results per query; {kk} were asked "
                            f"(with --store milvus rank at most {MAX_TOPK - 1}: --top-k / --max-rank)")
        flt = self.label_filter(label)
        out_s = np.zeros((nq, k), np.float32)
        out_i = np.full((nq, k), -1, np.int64)
        step = max(1, min(256, (1 << 20) // kk))
        params = self._search_params(kk)
        ex = None if exclude is None else np.asarray(exclude, np.int64).reshape(-1)
        for a in range(0, nq, step):
            q = self._prep(queries[a : a + step], "query descriptor")
            res = self._call("search", self._client.search, self.collection, data=q if self.metric == "hamming" else list(q),
                             limit=kk, filter=flt, output_fields=[_ID], search_params=params, anns_field=_VEC)
            for j, hits in enumerate(res):
                hid, dist = _hits_arrays(hits)
                sc = (1.0 - dist / self.dim) if self.metric == "hamming" else dist
                order = np.lexsort((hid, -sc))  # best first; ties in id order (deterministic)
                hid, sc = hid[order], sc[order]
                if ex is not None:
                    keep = hid != ex[a + j]
                    hid, sc = hid[keep], sc[keep]
                m = min(k, len(hid))
                out_i[a + j, :m] = hid[:m]
                out_s[a + j, :m] = sc[:m]
        return out_s, out_i

    def ids(self) -> np.ndarray:
        """Every stored id, sorted."""
        out: List[int] = []
        it = self._call("query_iterator", self._client.query_iterator, self.collection, batch_size=10000, filter="",
                        output_fields=[_ID])
        try:
            while True:
                batch = self._call("query_iterator", it.next)
                if not batch:
                    break
                out += [int(r[_ID]) for r in batch]
        finally:
            with contextlib.suppress(Exception), quiet():
                it.close()
        return np.asarray(sorted(out), np.int64)

    def fetch(self, ids: Sequence[int], fields: Sequence[str] = (_NAME, _LABEL)) -> Dict[str, Any]:
        """Stored ``fields`` (``vector``, ``name``, ``label``) of ``ids``, in the order asked; an id not stored raises."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        got: Dict[int, Dict[str, Any]] = {}
        for a in range(0, len(ids), ID_CHUNK):
            part = ids[a : a + ID_CHUNK].tolist()
            for r in self._call("get", self._client.get, self.collection, ids=part, output_fields=list(fields)):
                got[int(r[_ID])] = r
        missing = [int(i) for i in ids if int(i) not in got]
        if missing:
            raise CbirError(f"Milvus collection {self.collection} on {self.uri} has no id {missing[0]} "
                            f"({len(missing)} of {len(ids)} missing)")
        out: Dict[str, Any] = {}
        for f in fields:
            vals = [got[int(i)][f] for i in ids]
            if f == _VEC:
                if self.metric == "hamming":
                    out[f] = np.stack([np.frombuffer(bytes(v[0] if isinstance(v, list) else v), np.uint8) for v in vals]) if vals \
                        else np.zeros((0, self.dim // 8), np.uint8)
                else:
                    out[f] = np.asarray(vals, np.float32).reshape(len(vals), self.dim)
            else:
                out[f] = [str(v) for v in vals]
        return out

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored vectors of ``ids`` (L2-normalised floats, or packed codes)."""
        return self.fetch(ids, (_VEC,))[_VEC]

    def flush(self) -> None:
        """Seal what was inserted (durable on a server; Milvus Lite writes its WAL already)."""
        with contextlib.suppress(Exception), quiet():
            self._client.flush(self.collection)

    def record(self) -> Dict[str, Any]:
        """What :meth:`save` writes (and a manifest may record): no credentials."""
        return {"format": POINTER_FORMAT, "uri": self.uri, "collection": self.collection, "lite": self.lite,
                "index_type": self._index["index_type"], "metric_type": self._index["metric_type"],
                "index_params": self._index["params"], "dim": self.dim, "count": self.ntotal, "spec": self.spec.to_json()}

    def save(self, path: os.PathLike) -> None:
        """Flush, then write the pointer file (URI, collection, spec) to ``path`` (atomically)."""
        self.flush()
        write_json_atomic(self.record(), path)

    def describe(self) -> Dict[str, Any]:
        """For ``cbir index info``: where the vectors are and how they are searched."""
        r = self.record()
        return {"store": "milvus", "uri": r["uri"], "collection": r["collection"], "lite": r["lite"], "count": r["count"],
                "dim": r["dim"], "index_type": r["index_type"], "metric_type": r["metric_type"],
                "index_params": r["index_params"], "search_params": self._search_params(1)["params"]}

    def drop(self) -> None:
        """Delete the collection (a replaced or abandoned build's)."""
        if collection_exists(self._client, self.collection, self.uri):
            self._call("drop_collection", self._client.drop_collection, self.collection)
        self._count = 0

    def close(self) -> None:
        with contextlib.suppress(Exception), quiet():
            self._client.close()

    def __enter__(self) -> "MilvusBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
