"""The manifest: ``manifest.json``, what an index folder holds and how it was made — one schema, one builder.

:func:`write_manifest` is the only writer (a build, an update and a sync all go through it): it records every file
of the folder with its size and SHA-256, checks the result against the schema (:func:`validate_manifest`) and adds
the manifest's own checksum. :func:`load_manifest` is the reader's side: the same schema and checksum, checked
before anything is opened or allocated from the manifest. :func:`next_id` is where the next added image's id comes from.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from ..errors import CbirError, IndexDamaged
from .atomic import write_json_atomic
from .verify import damaged, file_record


#: the layout of an index folder: the file names a build writes
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FEATURES = "features.h5"
FAISS_FILES = {"cosine": "cosine.faiss", "hamming": "hamming.faiss"}
STATE_FILE = "extractor.h5"
LOCAL_FILE = "local.h5"
#: the pointer file of an index whose vectors are in Milvus (cbir.index.milvus), in place of the faiss file
MILVUS_FILE = "milvus.json"
#: files a build writes into an index folder (besides ``NAME.h5`` copies of bundled files, see ``folder.owned_name``)
OWNED_FILES = {MANIFEST, FEATURES, STATE_FILE, LOCAL_FILE, MILVUS_FILE, *FAISS_FILES.values()}
PLAIN_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


KINDS = ("float", "binary")
METRICS = ("cosine", "hamming")
ANNS = ("flat", "hnsw", "ivf")
MAX_DIM = 1 << 20
MAX_COUNT = 1 << 40
MAX_ID = 1 << 62  # ids are int64: room for MAX_COUNT more after the largest


def _fail(p: Path, what: str) -> CbirError:
    return IndexDamaged(f"{p}: invalid manifest ({what}) — rebuild the index")


def validate_manifest(m: Any, p: Path) -> Dict[str, Any]:
    """Check the manifest's types, bounds and file names before anything is opened or allocated from it."""
    if not isinstance(m, dict):
        raise _fail(p, "not a JSON object")

    def need(key, types, check=None, what=""):
        v = m.get(key)
        if isinstance(v, bool) or not isinstance(v, types):
            raise _fail(p, f"{key!r} must be {what or types}")
        if check is not None and not check(v):
            raise _fail(p, f"{key!r} is {str(v)[:60]!r}, must be {what or 'in range'}")
        return v

    ext = need("extractor", dict, what="an object")
    for k in ("name", "key", "key_nostate"):
        if not isinstance(ext.get(k), str) or not ext[k] or len(ext[k]) > 200:
            raise _fail(p, f"extractor.{k} must be a non-empty string")
    if not isinstance(ext.get("conf"), dict):
        raise _fail(p, "extractor.conf must be an object")
    if not isinstance(ext.get("weights", {}), dict) or not all(isinstance(v, str) for v in ext.get("weights", {}).values()):
        raise _fail(p, "extractor.weights must map names to SHA-256 strings")
    for k, v in ext["conf"].items():
        if isinstance(v, str) and v.startswith("@") and (v != f"@{k}" or not PLAIN_NAME.match(k)):
            raise _fail(p, f"extractor.conf.{k} refers to {v!r}: a bundled file must be '@{{its own plain key}}'")
    kind = need("kind", str, lambda v: v in KINDS, f"one of {KINDS}")
    need("dim", int, lambda v: 1 <= v <= MAX_DIM, f"an integer in 1..{MAX_DIM}")
    metric = need("metric", str, lambda v: v in METRICS, f"one of {METRICS}")
    if (kind == "binary") != (metric == "hamming"):
        raise _fail(p, f"kind {kind!r} does not go with metric {metric!r}")
    if metric == "hamming":
        need("code_bits", int, lambda v: 8 <= v <= MAX_DIM and v % 8 == 0, "a multiple of 8")
    vstore = m.get("store")
    if vstore is not None and (not isinstance(vstore, dict) or vstore.get("kind") != "milvus" or not isinstance(vstore.get("uri"), str)
                               or not isinstance(vstore.get("collection"), str)):
        raise _fail(p, "'store' must be null or {kind: milvus, uri, collection}")
    search_file = MILVUS_FILE if vstore is not None else FAISS_FILES[metric]
    need("faiss", str, lambda v: v == search_file, f"{search_file!r} for metric {metric}" + (" in a Milvus store" if vstore else ""))
    need("ann", str, lambda v: v in ANNS, f"one of {ANNS}")
    need("count", int, lambda v: 0 <= v <= MAX_COUNT, "a non-negative integer")
    if not isinstance(m.get("labels", []), list):
        raise _fail(p, "'labels' must be a list")
    if not isinstance(m.get("label_names", {}) or {}, dict):
        raise _fail(p, "'label_names' must be an object")
    local = m.get("local")
    if local is not None and (not isinstance(local, dict) or not isinstance(local.get("name"), str)):
        raise _fail(p, "'local' must be null or an object with a name")
    search = m.get("search")
    if search is not None:
        if not isinstance(search, dict) or search.get("metric") != metric:
            raise _fail(p, "'search' must be an object for the same metric")
        for k in ("dim_in", "dim", "code_bytes", "nlist", "nprobe", "ef", "hnsw_m"):
            v = search.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_DIM * 16):
                raise _fail(p, f"search.{k} must be a positive integer")
        removed = search.get("removed", [])
        if not isinstance(removed, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in removed):
            raise _fail(p, "search.removed must be a list of image ids")
        for k, allowed in (("codec", ("float32", "float16", "sq8", "pq")), ("ann", ANNS)):
            if search.get(k) not in allowed:
                raise _fail(p, f"search.{k} must be one of {allowed}")
    if m.get("graph") is not None:  # the graph stage queries get by default: bounded like a request's (expansion.MAX_K)
        from .expansion import parse_expand

        try:
            parse_expand(m["graph"])
        except CbirError as e:
            raise _fail(p, f"'graph': {e}") from None
    rec = m.get("knn")
    if rec is not None:
        from .expansion import MAX_K
        from .knn import GRAPH_FILE

        if not isinstance(rec, dict) or rec.get("file") != GRAPH_FILE:
            raise _fail(p, f"'knn' must be null or {{file: {GRAPH_FILE}, k}}")
        k = rec.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise _fail(p, f"knn.k must be an integer from 1 to {MAX_K}")
    if "next_id" in m and (isinstance(m["next_id"], bool) or not isinstance(m["next_id"], int) or not 0 <= m["next_id"] <= MAX_ID):
        raise _fail(p, f"'next_id' must be an integer in 0..{MAX_ID} (image ids are int64)")
    files = m.get("files")
    if files is not None:
        if not isinstance(files, dict):
            raise _fail(p, "'files' must be an object")
        for name, rec in files.items():
            if not PLAIN_NAME.match(name) or name == MANIFEST:
                raise _fail(p, f"file name {name[:60]!r} is not a plain name inside the index folder")
            if (not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or rec["bytes"] < 0
                    or not isinstance(rec.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", rec["sha256"])):
                raise _fail(p, f"files.{name} must hold bytes and a SHA-256")
    return m


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


#: the manifest's own checksum: SHA-256 of the canonical JSON of every other field (``manifest_digest``)
MANIFEST_SUM = "manifest_sha256"


def canonical_sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def manifest_digest(m: Dict[str, Any]) -> str:
    """The checksum a manifest records of itself: its fields but this one, as canonical JSON."""
    return canonical_sha256({k: v for k, v in m.items() if k != MANIFEST_SUM})


def check_manifest(m: Dict[str, Any], folder: os.PathLike) -> None:
    """A manifest edited after it was written is damage: its own checksum (when recorded: an index of an older cbir has
    none) and the extractor's ``key_nostate``, the digest of its name, conf and weights (``Extractor.key(with_state=False)``),
    must match what it holds. (``key`` also covers a learned state that may be refined after it was taken: the state
    file's own checksum guards that.) Checked before anything is opened from it."""
    if MANIFEST_SUM in m and m[MANIFEST_SUM] != manifest_digest(m):
        raise damaged(folder, MANIFEST, "checksum mismatch: edited since it was written", m)
    ext = m["extractor"]
    ident = {k: v for k, v in ext.items() if k not in ("key", "key_nostate", "state")}
    try:
        key = canonical_sha256(ident)[:16]
    except (TypeError, ValueError):
        raise damaged(folder, MANIFEST, "the extractor record is not plain JSON", m) from None
    if key != ext["key_nostate"]:
        raise damaged(folder, MANIFEST, f"extractor key {ext['key_nostate']} does not match its recorded conf (edited?)", m)


def load_manifest(folder: os.PathLike) -> Dict[str, Any]:
    """``folder/manifest.json`` parsed and checked (format version, schema, own checksum, extractor key): a one-line
    :class:`IndexDamaged` naming it otherwise. (:func:`cbir.index.folder.read_manifest` first puts back a folder an
    interrupted swap left missing, and says what a folder without a manifest is.)"""
    p = Path(folder) / MANIFEST
    if p.is_symlink():
        raise IndexDamaged(f"{p}: a symbolic link ({os.readlink(p)}); an index file must be a plain file inside the folder "
                           "— rebuild the index")
    try:
        m = json.loads(p.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise IndexDamaged(f"{p}: damaged (not valid JSON: {e}) — rebuild the index") from None
    except RecursionError:
        raise IndexDamaged(f"{p}: damaged (nested too deeply to be a manifest) — rebuild the index") from None
    except OSError as e:
        raise IndexDamaged(f"{p}: cannot read ({e.strerror})") from None
    v = m.get("format_version") if isinstance(m, dict) else None
    if v != FORMAT_VERSION:
        raise CbirError(f"{p}: index format version {v!r}, this cbir reads version {FORMAT_VERSION}; rebuild the index")
    validate_manifest(m, p)
    check_manifest(m, folder)
    return m


def next_id(manifest: Optional[Dict[str, Any]], ids) -> int:
    """The id the next added image gets: past every id the index holds and every id it ever gave (``next_id`` of the
    manifest), so a removed image's id is never reused."""
    ids = np.asarray(ids)
    top = int(ids.max()) + 1 if len(ids) else 0
    return int(max(int((manifest or {}).get("next_id", 0)), top))


def write_manifest(folder: os.PathLike, fields: Dict[str, Any], base: Optional[Dict[str, Any]] = None,
                   event: Optional[Dict[str, Any]] = None, known: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Write ``folder/manifest.json`` (atomic) and return it: the manifest of a new index (``base`` None: ``fields`` with
    the format version and creation time) or ``base`` (the manifest of the index being replaced) under ``fields``,
    with an update's ``event`` added to its history (the last 100 kept). ``files`` records each file ``folder``
    holds now (size, SHA-256; ``known``: records of files copied unchanged, not hashed again). The result is checked
    against the schema before it is written, then gets its own checksum."""
    folder = Path(folder)
    m = {**base, **fields} if base is not None else {"format_version": FORMAT_VERSION, "created": now_iso(), **fields}
    m.pop(MANIFEST_SUM, None)
    if event is not None:
        at = now_iso()
        m["updated"] = at
        m["history"] = [*(m.get("history") or []), {**event, "at": at}][-100:]
    known = known or {}
    m["files"] = {p.name: known.get(p.name) or file_record(p) for p in sorted(folder.iterdir())
                  if p.is_file() and p.name != MANIFEST}
    validate_manifest(m, folder / MANIFEST)
    m[MANIFEST_SUM] = manifest_digest(m)
    write_json_atomic(m, folder / MANIFEST)
    return m
