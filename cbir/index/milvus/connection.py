"""Milvus connections: ``--store milvus:URI`` parsed, collection names, pymilvus imported and kept quiet, a client
connected (Milvus Lite's one-process lock named), collections listed, dropped, and Lite's embedded server released."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Optional, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

from ...errors import CbirError

SERVER_SCHEMES = ("http", "https", "tcp")
#: what a Milvus collection may be named
COLLECTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$")
_INSTALL = "pip install 'cbir[milvus]'"


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


def require_pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise CbirError(f"--store milvus needs pymilvus, which is not installed: {_INSTALL}") from None
    return pymilvus


@contextlib.contextmanager
def quiet():
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
    pm = require_pymilvus()
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
        with quiet():
            return pm.MilvusClient(uri=uri, token=tok) if tok else pm.MilvusClient(uri=uri)
    except Exception as e:  # noqa: BLE001 - pymilvus raises its own exception types, and grpc's
        if lite and _lite_locked(uri):
            raise CbirError(f"{uri}: this Milvus Lite database is open in another process (a running `cbir serve`?); "
                            "Milvus Lite serves one process at a time: stop that process, or keep the vectors on a "
                            "Milvus server (--store milvus:http://host:19530)") from None
        what = "open the Milvus Lite database" if lite else "reach the Milvus server at"
        raise CbirError(f"cannot {what} {uri}: {error_text(e)}") from None


def error_text(e: Exception) -> str:
    """One line of at most 500 characters for a pymilvus / grpc exception."""
    m = getattr(e, "message", None) or str(e)
    return " ".join(str(m).split())[:500]


def collection_exists(client, collection: str, uri: str) -> bool:
    """Whether ``collection`` exists behind ``client``; a failure to list is a one-line :class:`CbirError`."""
    try:
        with quiet():
            return bool(client.has_collection(collection))
    except Exception as e:  # noqa: BLE001
        raise CbirError(f"{uri}: cannot list Milvus collections: {error_text(e)}") from None


def drop_collection(uri: str, collection: str, token: Optional[str] = None) -> bool:
    """Drop ``collection`` at ``uri`` if it exists (True when it did): an old build's, once its replacement is in place."""
    c = connect(uri, token)
    try:
        if collection_exists(c, collection, uri):
            with quiet():
                c.drop_collection(collection)
            return True
        return False
    finally:
        with contextlib.suppress(Exception), quiet():
            c.close()


def release_lite(uri: str) -> None:
    """Stop this process' embedded Milvus Lite server for ``uri`` and release its lock (else held until exit)."""
    if not is_lite(uri):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    with quiet():
        server_manager_instance.release_server(uri)
