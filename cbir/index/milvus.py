"""A gallery's vectors in a Milvus collection: the same small interface as :class:`cbir.index.backend.FaissBackend`.

``--store milvus:URI`` keeps the vectors, ids, names and labels in a Milvus collection; cbir's manifest, features and
learned state stay in the index folder, which holds a small pointer file (:data:`POINTER_FILE`: URI, collection, spec).

* ``URI`` is a Milvus Lite database (a path ending in ``.db``, embedded in the process: ``milvus:./gallery.db``) or a
  server (``milvus:http://host:19530``, ``https://``, ``tcp://``, ``unix:``). Credentials are never recorded: a server
  that needs them reads ``$MILVUS_TOKEN`` (``user:password`` or an API key).
* Float descriptors: a ``FLOAT_VECTOR`` field searched by inner product of L2-normalised vectors, exactly the scores of
  FaissBackend's cosine index (``FLAT`` gives the same ranking as faiss flat). ``ivf`` / ``hnsw`` / ``sq8`` / ``pq``
  map to IVF_FLAT, HNSW, IVF_SQ8 / HNSW_SQ and IVF_PQ; Hamming codes to ``BINARY_VECTOR`` with BIN_FLAT /
  BIN_IVF_FLAT, scored ``1 - hamming / bits`` like FaissBackend.
* Milvus Lite has no binary vectors and no product quantisation: ``hash`` (Hamming) and ``--codec pq`` are refused
  there with a message naming the alternatives (those two mappings need a server: present, not testable here).
  Lite is also limited to an exact flat scan: pymilvus 3 sends IVF/HNSW build parameters in a form milvus-lite 3.2
  does not read (it would build 128 lists whatever ``--nlist`` says), so ``--ann ivf|hnsw`` / ``--codec sq8`` are
  refused there too (measured: IVF with nprobe 16 found 36 % of the exact top 10). :func:`auto_store_spec` picks
  what a store can take.
  Milvus keeps descriptors as they are, so a PCA (``--dim`` below the descriptor's dimension) is refused everywhere,
  as is ``float16`` (not mapped).
* Milvus Lite (milvus-lite 3.x) runs inside the process that opens the ``.db`` folder and locks it: a second process
  (a ``cbir query`` while ``cbir serve`` holds it) gets a :class:`CbirError` saying so; a server has no such limit.
* At most :data:`MAX_TOPK` results per query (Milvus' own limit); ask for fewer (``--max-rank``) on larger galleries.

pymilvus (and milvus-lite for ``.db`` URIs) are imported only when a Milvus store is used: ``pip install 'cbir[milvus]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from ..errors import CbirError, IndexDamaged, IndexMismatch
from .backend import SearchSpec
from .faiss_index import check_queries, l2_normalise, search_sizes
from .store import write_json_atomic

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
SERVER_SCHEMES = ("http", "https", "tcp")
_INSTALL = "pip install 'cbir[milvus]'"
_COLLECTION = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_ID, _VEC, _NAME, _LABEL = "id", "vector", "name", "label"


# ------------------------------------------------------------------------------- URIs


def is_lite(uri: str) -> bool:
    """A Milvus Lite database (a local ``.db`` path), as opposed to a server URI."""
    return "://" not in uri and not uri.startswith("unix:")


def _strip_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def parse_store(store: Optional[str], out: Optional[Union[str, os.PathLike]] = None) -> Tuple[str, Optional[str]]:
    """``--store`` as ``(kind, uri)``: ``("faiss", None)`` for ``faiss`` (or nothing), ``("milvus", uri)`` for ``milvus:URI``.

    A Milvus Lite path is made absolute (an index can be queried from any working directory), must end in ``.db``
    (pymilvus' rule for local databases) and sit in an existing folder; with ``out`` (the index folder) it may not be
    inside it, as a rebuild replaces that folder whole. Server URIs keep their scheme, host and port; user and
    password are dropped from what is recorded (``$MILVUS_TOKEN`` supplies them).
    """
    if store is None or store == "" or store == "faiss":
        return "faiss", None
    kind, sep, rest = str(store).partition(":")
    if kind != "milvus" or not sep:
        raise CbirError(f"unknown --store {store!r}: use faiss (the default) or milvus:URI "
                        "(milvus:./gallery.db for an embedded Milvus Lite file, milvus:http://host:19530 for a server)")
    uri = rest.strip()
    if not uri:
        raise CbirError("--store milvus: needs a URI: milvus:./gallery.db (Milvus Lite) or milvus:http://host:19530 (a server)")
    if "://" in uri:
        scheme = uri.split("://", 1)[0].lower()
        if scheme not in SERVER_SCHEMES:
            raise CbirError(f"--store {store!r}: unknown URI scheme {scheme!r}; a Milvus server is "
                            f"{', '.join(s + '://host:port' for s in SERVER_SCHEMES)}, Milvus Lite a path ending in .db")
        parts = urlsplit(uri)
        if not parts.hostname:
            raise CbirError(f"--store {store!r}: no host in the server URI (e.g. milvus:http://localhost:19530)")
        return "milvus", _strip_credentials(uri)
    if uri.startswith("unix:"):
        return "milvus", uri
    path = Path(os.path.abspath(os.path.expanduser(uri)))
    if path.suffix != ".db":
        raise CbirError(f"--store {store!r}: a Milvus Lite database is a path ending in .db (e.g. milvus:{path.with_suffix('.db')}); "
                        "a server URI starts with http://")
    if not path.parent.is_dir():
        raise CbirError(f"--store {store!r}: folder {path.parent} does not exist (Milvus Lite creates {path.name} in it)")
    if path.exists() and not path.is_dir():
        raise CbirError(f"--store {store!r}: {path} exists and is not a Milvus Lite database (Milvus Lite keeps a folder there)")
    if out is not None:
        o = Path(os.path.abspath(out))
        for folder in (o, o.with_name(o.name + ".partial")):
            if path == folder or folder in path.parents:
                raise CbirError(f"--store {store!r}: the Milvus Lite database may not be inside the index folder {o} "
                                "(a rebuild replaces that folder whole); put it beside it")
    return "milvus", str(path)


def collection_name(out: Union[str, os.PathLike]) -> str:
    """A fresh, valid collection name for the index folder ``out`` (``cbir_<folder>_<8 hex>``): a rebuild writes a new
    collection and drops the old one only once the new index folder is in place."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(os.path.abspath(out)).name)[:80] or "index"
    return f"cbir_{stem}_{secrets.token_hex(4)}"


# ------------------------------------------------------------------------------- pymilvus, quietly


def milvus_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pymilvus") is not None


def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise CbirError(f"--store milvus needs pymilvus, which is not installed: {_INSTALL}") from None
    return pymilvus


@contextlib.contextmanager
def _quiet():
    """pymilvus and milvus-lite log every failed call with a traceback; cbir turns them into one-line errors itself."""
    loggers = [logging.getLogger(n) for n in ("pymilvus", "milvus_lite", "grpc")]  # grpc: Milvus Lite's in-process server
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _lite_locked(path: str) -> bool:
    """Whether another process holds Milvus Lite's lock on the database folder ``path``."""
    import fcntl

    lock = Path(path) / "LOCK"
    if not lock.is_file():
        return False
    try:
        with open(lock, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except OSError:
        return False
    return False


def connect(uri: str, token: Optional[str] = None):
    """A ``pymilvus.MilvusClient`` for ``uri`` (see :func:`parse_store`); errors are one-line :class:`CbirError`."""
    pm = _pymilvus()
    lite = is_lite(uri)
    if lite:
        try:
            import milvus_lite  # noqa: F401
        except ImportError:
            raise CbirError(f"{uri}: a Milvus Lite database needs milvus-lite, which is not installed: {_INSTALL}") from None
        if not Path(uri).parent.is_dir():
            raise CbirError(f"{uri}: folder {Path(uri).parent} does not exist")
    tok = token if token is not None else os.environ.get("MILVUS_TOKEN", "")
    try:
        with _quiet():
            return pm.MilvusClient(uri=uri, token=tok) if tok else pm.MilvusClient(uri=uri)
    except Exception as e:  # noqa: BLE001 - pymilvus raises its own exception types, and grpc's
        if lite and _lite_locked(uri):
            raise CbirError(f"{uri}: this Milvus Lite database is open in another process (a running `cbir serve`?); "
                            "Milvus Lite serves one process at a time: stop that process, or keep the vectors on a "
                            "Milvus server (--store milvus:http://host:19530)") from None
        what = "open the Milvus Lite database" if lite else "reach the Milvus server at"
        raise CbirError(f"cannot {what} {uri}: {_msg(e)}") from None


def _msg(e: Exception) -> str:
    m = getattr(e, "message", None) or str(e)
    return " ".join(str(m).split())[:500]


# ------------------------------------------------------------------------------- spec -> Milvus index


def check_spec(spec: SearchSpec, uri: str) -> None:
    """Refuse, with the alternative named, what this Milvus (Lite or server) cannot store as ``spec`` asks."""
    lite = is_lite(uri)
    if spec.metric == "hamming" and lite:
        raise CbirError("Milvus Lite has no binary vectors: a Hamming index (--extractor hash) needs a Milvus server "
                        "(--store milvus:http://host:19530) or the faiss store (drop --store); float extractors work on Milvus Lite")
    if spec.codec == "pq" and lite:
        raise CbirError("Milvus Lite has no product quantisation (IVF_PQ): drop --codec pq (float32 or sq8 work on Milvus Lite), "
                        "use a Milvus server (--store milvus:http://host:19530) or the faiss store (drop --store)")
    if spec.codec == "float16":
        raise CbirError("--codec float16 is not available with --store milvus: use float32 or sq8 (or the faiss store)")
    if spec.dim and spec.dim < spec.dim_in:
        raise CbirError(f"--store milvus keeps the {spec.dim_in}-d descriptors as they are: a PCA to --dim {spec.dim} is only "
                        "available with the faiss store (drop --dim)")
    if spec.ann == "hnsw" and spec.codec == "pq":
        raise CbirError("--ann hnsw stores float32 or sq8 vectors; use --ann ivf or flat with --codec pq")
    if lite and (spec.ann != "flat" or spec.codec != "float32"):
        # pymilvus 3 sends index parameters (nlist, M, ...) flattened, milvus-lite 3.2 reads them from one JSON key: Lite
        # would build its own defaults (IVF: 128 lists, whatever --nlist says) and search them with the recall of those
        raise CbirError(f"Milvus Lite searches float32 vectors exactly (--ann flat): --ann {spec.ann} / --codec {spec.codec} "
                        "would not get their parameters there; drop them, use a Milvus server (--store milvus:http://host:19530) "
                        "or the faiss store")


def auto_store_spec(metric: str, dim_in: int, n: int, uri: str, ann: str = "auto", codec: Optional[str] = None,
                    code_bytes: Optional[int] = None, nlist: Optional[int] = None, memory_budget: Optional[float] = None,
                    dim: Optional[int] = None) -> SearchSpec:
    """What :func:`cbir.index.backend.auto_spec` chooses, for a Milvus store: never a PCA (Milvus keeps descriptors as
    they are), and on Milvus Lite an exact flat scan unless something else is asked (then refused, naming why)."""
    from .backend import auto_spec

    if is_lite(uri) and ann in ("auto", "flat") and codec in (None, "float32") and not dim and not code_bytes:
        spec = SearchSpec(metric=metric, dim_in=int(dim_in))
    else:
        spec = auto_spec(metric, int(dim_in), int(n), ann=ann, codec=codec, dim=dim or (int(dim_in) if metric == "cosine" else None),
                         code_bytes=code_bytes, memory_budget=memory_budget, nlist=nlist)
        if spec.dim == spec.dim_in:
            spec.dim = None
    check_spec(spec, uri)
    return spec


def index_params(spec: SearchSpec) -> Dict[str, Any]:
    """``{"index_type", "metric_type", "params"}`` of the Milvus vector index for ``spec`` (see the module doc)."""
    nlist = int(spec.nlist or 64) if spec.ann == "ivf" else 1
    if spec.metric == "hamming":
        if spec.ann == "ivf":
            return {"index_type": "BIN_IVF_FLAT", "metric_type": "HAMMING", "params": {"nlist": nlist}}
        return {"index_type": "BIN_FLAT", "metric_type": "HAMMING", "params": {}}
    hnsw = {"M": int(spec.hnsw_m), "efConstruction": max(40, 2 * int(spec.hnsw_m))}
    if spec.codec == "pq":
        return {"index_type": "IVF_PQ", "metric_type": "IP", "params": {"nlist": nlist, "m": int(spec.code_bytes), "nbits": 8}}
    if spec.codec == "sq8":
        if spec.ann == "hnsw":
            return {"index_type": "HNSW_SQ", "metric_type": "IP", "params": {**hnsw, "sq_type": "SQ8"}}
        return {"index_type": "IVF_SQ8", "metric_type": "IP", "params": {"nlist": nlist}}  # flat sq8: one list, scanned whole
    if spec.ann == "ivf":
        return {"index_type": "IVF_FLAT", "metric_type": "IP", "params": {"nlist": nlist}}
    if spec.ann == "hnsw":
        return {"index_type": "HNSW", "metric_type": "IP", "params": hnsw}
    return {"index_type": "FLAT", "metric_type": "IP", "params": {}}


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


# ------------------------------------------------------------------------------- the backend


class MilvusBackend:
    """A gallery's search structure in a Milvus collection; ids are int64 image ids (the primary key).

    ``MilvusBackend(spec, uri, collection)`` makes a new, empty collection (``overwrite=True`` replaces one of that
    name); :meth:`open` reads an index folder's pointer file; :meth:`attach` takes an existing collection by name.
    """

    def __init__(self, spec: SearchSpec, uri: str, collection: str, overwrite: bool = False, token: Optional[str] = None,
                 _client=None, _create: bool = True) -> None:
        check_spec(spec, uri)
        if not _COLLECTION.match(collection or ""):
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
        if not cls._exists(client, collection, uri):
            with contextlib.suppress(Exception), _quiet():
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

    @staticmethod
    def _exists(client, collection: str, uri: str) -> bool:
        try:
            with _quiet():
                return bool(client.has_collection(collection))
        except Exception as e:  # noqa: BLE001
            raise CbirError(f"{uri}: cannot list Milvus collections: {_msg(e)}") from None

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            with _quiet():
                return fn(*args, **kwargs)
        except CbirError:
            raise
        except Exception as e:  # noqa: BLE001 - pymilvus / grpc errors, one line with the collection named
            raise CbirError(f"Milvus {what} failed on {self.uri} (collection {self.collection}): {_msg(e)}") from None

    def _create(self, overwrite: bool) -> None:
        pm = _pymilvus()
        c = self._client
        if self._exists(c, self.collection, self.uri):
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
            with _quiet():
                self._client.load_collection(self.collection)
        except Exception as e:  # noqa: BLE001 - a server that cannot load it (memory) says why
            if not self.lite:
                raise CbirError(f"Milvus cannot load collection {self.collection} on {self.uri}: {_msg(e)}") from None

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
            with contextlib.suppress(Exception), _quiet():
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
        with contextlib.suppress(Exception), _quiet():
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
        if self._exists(self._client, self.collection, self.uri):
            self._call("drop_collection", self._client.drop_collection, self.collection)
        self._count = 0

    def close(self) -> None:
        with contextlib.suppress(Exception), _quiet():
            self._client.close()

    def __enter__(self) -> "MilvusBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def drop_collection(uri: str, collection: str, token: Optional[str] = None) -> bool:
    """Drop ``collection`` at ``uri`` if it exists (True when it did): an old build's, once its replacement is in place."""
    c = connect(uri, token)
    try:
        if MilvusBackend._exists(c, collection, uri):
            with _quiet():
                c.drop_collection(collection)
            return True
        return False
    finally:
        with contextlib.suppress(Exception), _quiet():
            c.close()


def release_lite(uri: str) -> None:
    """Stop this process' embedded Milvus Lite server for ``uri`` and release its lock (else held until exit)."""
    if not is_lite(uri):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    with _quiet():
        server_manager_instance.release_server(uri)


__all__ = ["MilvusBackend", "parse_store", "collection_name", "check_spec", "auto_store_spec", "index_params", "connect", "drop_collection",
           "release_lite", "milvus_available", "is_lite", "POINTER_FILE", "MAX_TOPK"]
