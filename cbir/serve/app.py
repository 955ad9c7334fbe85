"""The HTTP service: FastAPI routes over :mod:`cbir.engine`, and the page at ``/``.

    from cbir.serve.app import ServeConfig, create_app
    app = create_app(ServeConfig(indexes={"demo": "indexes/demo"}))     # then uvicorn.run(app) or TestClient(app)

Every error is JSON ``{"error": message, "status": code}`` (``cause`` too for an unreadable upload). Files are only
ever opened from what the index recorded (gallery images by name) or from the package itself (the page); no
request names a path. Limits: body size (413), decoded pixels (``cbir.data.set_limits``), a deadline per request
(408 for a slow upload, 504 for slow work), a bounded number of requests in progress and of queued queries
(503 with ``Retry-After``), and an API token when one is configured (401).
"""

# no `from __future__ import annotations`: FastAPI reads the route annotations, whose types are imported in create_app
import asyncio
import base64
import hashlib
import hmac
import io
import ipaddress
import json
import logging
import mimetypes
import os
import re
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import numpy as np

from .. import __version__
from ..errors import CbirError, DecodeError, IndexDamaged, IndexMismatch
from .state import Batcher, Busy, IndexSlot, Loaded, TimedOut, Watcher, WorkGate

log = logging.getLogger("cbir.serve")

MB = 1024 * 1024
#: multipart framing and small form fields allowed on top of the file(s) in a request body
FORM_OVERHEAD = 64 * 1024
#: a refused body up to this size (or twice the limit) is read and dropped before the 413, so that clients which send
#: the whole body before reading the answer get it; a larger one is answered at once and the connection closed
DRAIN_BYTES = 64 * MB
#: paths anyone may fetch without the token: the page and its script carry no data, /health says only "ok"
PUBLIC_PATHS = frozenset({"/", "/health", "/static/app.js", "/static/style.css", "/favicon.ico", "/docs", "/openapi.json",
                          "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png"})
#: paths that do no work worth bounding (served from memory)
LIGHT_PATHS = PUBLIC_PATHS | {"/info"}
STATIC_FILES = {"app.js": "application/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
#: Swagger UI 5 (OpenAPI 3.1, which FastAPI writes), from the fastapi-offline wheel: served name -> (its file, media type)
DOCS_ASSETS = {"swagger-ui-bundle.js": ("swagger-ui-bundle.js", "application/javascript"), "swagger-ui.css": ("swagger-ui.css", "text/css"),
               "favicon.png": ("favicon.png", "image/png")}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
#: names accepted for new gallery images: relative, no '..' part, no control characters or backslashes
_NAME_RE = re.compile(r"^[\w][\w .\-/]{0,199}$")
_INDEX_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass
class ServeConfig:
    """Everything ``cbir serve`` takes; the defaults are the CLI's."""

    indexes: Dict[str, str]                     # name -> index folder; the first is the default
    token: Optional[str] = None                 # required on every API call when set
    max_upload_bytes: int = 20 * MB             # per uploaded file; the request body may hold this plus FORM_OVERHEAD
    timeout_s: float = 60.0                     # a request's whole time: upload, queue, work
    queue: int = 32                             # requests in progress at once (beyond: 503) and queries waiting for the extractor;
                                                # a request holds its place once its body is received (a slow upload holds none)
    max_receiving_per_client: int = 64          # uploads one client address may be sending at once (beyond: 503)
    max_batch: int = 1                          # queries described in one extractor call (1: no batching; on 2 CPU cores
                                                # batching was no faster, slower for MobileNetV2: benchmarks/results/serve.json)
    batch_wait_s: float = 0.0                   # how long a worker waits for more queries before a batch smaller than max_batch
    workers: int = 1                            # threads running extractor batches (and heavy jobs: re-ranking, matching)
    max_top_k: int = 100
    rerank_top: int = 100                       # candidates verified per re-ranked query by default
    allow_write: bool = False                   # POST /images, DELETE /images/{name}
    upload_dir: Optional[str] = None            # where POST /images keeps files (default: INDEX.uploads beside each index)
    match_features: str = "xfeat"               # POST /match (and the page's "why?" overlay)
    match_matcher: str = "lighterglue"
    match_side: int = 640                       # images are matched and drawn at this longer side
    reload_s: float = 1.0                       # how often the index folders are checked for a new version (0: never)
    allowed_hosts: Optional[List[str]] = None   # Host header names accepted (None: any); DNS-rebinding guard on loopback
    thumb_side: int = 256
    warm: bool = True                           # run one query at start-up so that the first request is not slower

    def check(self) -> None:
        if not self.indexes:
            raise CbirError("no index to serve: give --index DIR")
        for name in self.indexes:
            if not _INDEX_NAME_RE.match(name):
                raise CbirError(f"index name {name!r}: use letters, digits, '_', '-' and '.' (at most 64), e.g. --index demo=indexes/demo")
        for what, v in (("the upload limit", self.max_upload_bytes), ("the timeout", self.timeout_s), ("the queue length", self.queue),
                        ("the batch size", self.max_batch), ("the number of workers", self.workers), ("the top-k limit", self.max_top_k)):
            if not v or v <= 0:
                raise CbirError(f"{what} must be positive, got {v}")
        if self.token is not None and len(self.token) < 16:
            raise CbirError("the API token must have at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = int(status), message, headers or {}, extra


def _error_body(status: int, message: str, **extra: Any) -> Dict[str, Any]:
    return {"error": message, "status": int(status), **extra}


def decode_status(cause: str) -> int:
    """HTTP status of an unreadable upload, from :class:`DecodeError`'s cause."""
    c = cause.lower()
    if "too large" in c or "budget" in c:
        return 413
    if c.startswith("not an image"):
        return 415
    return 400  # empty, truncated, corrupt, too small


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------- the service


class Service:
    """The state behind the routes: index slots, the batcher, the heavy-work gate, the matcher."""

    def __init__(self, cfg: ServeConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.slots: Dict[str, IndexSlot] = {}
        for name, folder in cfg.indexes.items():
            self.slots[name] = IndexSlot(name, folder, warm=cfg.warm)
        self.default = next(iter(self.slots))
        self.batcher = Batcher(max_batch=cfg.max_batch, capacity=cfg.queue, workers=cfg.workers, wait_s=cfg.batch_wait_s)
        self.gate = WorkGate(slots=cfg.workers, capacity=cfg.queue)
        self.watcher = Watcher(list(self.slots.values()), cfg.reload_s)
        self.write_lock = threading.Lock()
        self._match: Optional[Tuple[Any, Any]] = None
        self._match_lock = threading.Lock()
        self.started = time.time()
        self.inflight = 0
        self.receiving: Dict[str, int] = {}  # client address -> uploads being received
        self.requests = 0

    def start(self) -> None:
        self.batcher.start()
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.batcher.stop()

    def slot(self, index: Optional[str]) -> IndexSlot:
        name = index or self.default
        s = self.slots.get(name)
        if s is None:
            raise ApiError(404, f"no index named {name!r} is served; served: {', '.join(sorted(self.slots))}")
        return s

    def loaded(self, index: Optional[str]) -> Loaded:
        return self.slot(index).get()

    def matcher(self) -> Tuple[Any, Any]:
        """The local features + matcher of POST /match, built on first use and kept."""
        with self._match_lock:
            if self._match is None:
                from ..local import build_extractor, build_matcher

                feats = build_extractor(self.cfg.match_features)
                self._match = (feats, build_matcher(self.cfg.match_matcher, features=self.cfg.match_features))
            return self._match

    def upload_dir(self, slot: IndexSlot) -> Path:
        if self.cfg.upload_dir:
            d = Path(self.cfg.upload_dir) / slot.name if len(self.slots) > 1 else Path(self.cfg.upload_dir)
        else:
            d = slot.folder.parent / f"{slot.folder.name}.uploads"
        return d.resolve()


# ----------------------------------------------------------------------------------------------- the ASGI guard


class Guard:
    """Raw ASGI middleware in front of every route: Host and Origin checks, the token, the body limit (413, before
    reading when Content-Length says so), the upload deadline (408), the requests-in-progress bound (503), the
    request deadline (504) and the security headers of every response."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service
        cfg = service.cfg
        self.token = cfg.token.encode() if cfg.token else None
        self.allowed_hosts = {h.lower() for h in cfg.allowed_hosts} if cfg.allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg = self.service.cfg
        loop = asyncio.get_running_loop()
        t_end = loop.time() + cfg.timeout_s
        scope["cbir.deadline"] = time.monotonic() + cfg.timeout_s
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        path, method = scope.get("path", ""), scope.get("method", "GET")
        st = {"started": False, "ours": False}
        page = path == "/" or path.startswith("/static/")

        async def guarded_send(message):
            if st["ours"]:
                return  # this request was already answered here (413, 408, 504): the app's late reply is dropped
            if message["type"] == "http.response.start":
                st["started"] = True
                hs = list(message.get("headers") or [])
                hs += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not path.startswith("/docs"):
                    hs.append((b"x-frame-options", b"DENY"))
                if page:
                    hs.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": hs}
            await send(message)

        async def answer(status: int, message: str, extra_headers: Optional[Dict[str, str]] = None) -> None:
            if st["started"] or st["ours"]:
                return
            body = json.dumps(_error_body(status, message)).encode()
            hs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            hs += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
            await guarded_send({"type": "http.response.start", "status": status, "headers": hs})
            await guarded_send({"type": "http.response.body", "body": body})
            st["ours"] = True

        # -- who may ask
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]").lower() not in self.allowed_hosts:
                return await answer(421, f"Host {host!r} is not served here (DNS rebinding guard); use http://127.0.0.1 or http://localhost")
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin and origin != "null" and origin.split("://", 1)[-1].lower() != headers.get("host", "").lower():
                return await answer(403, f"cross-origin {method} from {origin!r} refused")
            if origin == "null":
                return await answer(403, f"{method} from an opaque origin refused")
        if self.token is not None and path not in PUBLIC_PATHS and not self._authorised(headers):
            return await answer(401, "this service needs its API token: send 'Authorization: Bearer TOKEN' (or the page asks for it)",
                                {"www-authenticate": "Bearer"})
        # -- how much
        limit = cfg.max_upload_bytes * (2 if path == "/match" else 1) + FORM_OVERHEAD
        declared = headers.get("content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await answer(400, f"invalid Content-Length {declared!r}")
            if n > limit:
                if "100-continue" not in headers.get("expect", "").lower() and n <= max(DRAIN_BYTES, 2 * limit):
                    await self._drain(receive, t_end, loop, max(DRAIN_BYTES, 2 * limit))
                return await answer(413, f"upload too large: {n:,} bytes; this service takes files up to {cfg.max_upload_bytes:,} bytes "
                                         f"({cfg.max_upload_bytes / MB:g} MB)")
        light = path in LIGHT_PATHS or method in ("HEAD", "OPTIONS")
        svc = self.service
        # a request with a body takes its place in the queue when the body is in (slow uploads hold no place; each client
        # may send only so many at once); one without a body takes it now
        has_body = method in ("POST", "PUT", "PATCH") and (declared not in (None, "0") or "transfer-encoding" in headers)
        client = (scope.get("client") or ("?", 0))[0]
        st["held"] = st["receiving"] = False

        def busy_message() -> Tuple[str, Dict[str, str]]:
            ra = svc.batcher.retry_after()
            return f"busy: {svc.inflight} requests in progress (at most {cfg.queue}); retry in {ra} s", {"retry-after": str(ra)}

        def stop_receiving() -> None:
            if st["receiving"]:
                st["receiving"] = False
                svc.receiving[client] -= 1
                if svc.receiving[client] <= 0:
                    del svc.receiving[client]

        if not light and not has_body:
            if svc.inflight >= cfg.queue:
                return await answer(503, *busy_message())
            svc.inflight += 1
            st["held"] = True
        elif not light:
            if svc.receiving.get(client, 0) >= cfg.max_receiving_per_client:
                return await answer(503, f"busy: {cfg.max_receiving_per_client} uploads from {client} are still being received; "
                                         "retry when one is done", {"retry-after": "5"})
            svc.receiving[client] = svc.receiving.get(client, 0) + 1
            st["receiving"] = True
        svc.requests += 1
        got = {"n": 0}

        async def guarded_receive():
            if st["ours"]:
                return {"type": "http.disconnect"}
            left = t_end - loop.time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.05, left))
            except asyncio.TimeoutError:
                await answer(408, f"the upload did not complete within the request time limit ({cfg.timeout_s:g} s)")
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                got["n"] += len(message.get("body", b""))
                if got["n"] > limit:
                    if message.get("more_body"):
                        await self._drain(receive, t_end, loop, max(DRAIN_BYTES, 2 * limit) - got["n"])
                    await answer(413, f"upload too large: over {limit:,} bytes; this service takes files up to "
                                      f"{cfg.max_upload_bytes:,} bytes ({cfg.max_upload_bytes / MB:g} MB)")
                    return {"type": "http.disconnect"}
                if not message.get("more_body") and st["receiving"]:  # the whole body is in: now it takes a place
                    stop_receiving()
                    if svc.inflight >= cfg.queue:
                        await answer(503, *busy_message())
                        return {"type": "http.disconnect"}
                    svc.inflight += 1
                    st["held"] = True
            elif st["receiving"]:
                stop_receiving()  # the client went away
            return message

        task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))

        def finished(t: asyncio.Task) -> None:
            stop_receiving()
            if st["held"]:
                st["held"] = False
                svc.inflight -= 1
            if not t.cancelled() and t.exception() is not None and not st["ours"]:
                log.error("request %s %s failed: %r", method, path, t.exception())

        task.add_done_callback(finished)
        done, _ = await asyncio.wait({task}, timeout=max(0.05, t_end - loop.time()) + 1.0)
        if task in done:
            if task.exception() is not None and not st["ours"]:
                if not st["started"]:
                    await answer(500, f"internal error ({type(task.exception()).__name__}); see the server log")
            return
        # past the deadline: answer now; the work goes on in its thread and its reply is dropped
        await answer(504, f"no answer within the request time limit ({cfg.timeout_s:g} s)")
        task.cancel()

    @staticmethod
    async def _drain(receive, t_end: float, loop, cap: int) -> None:
        """Read and drop the rest of a refused body (up to ``cap`` bytes, until the deadline): a client that sends its
        whole body before reading (no ``Expect: 100-continue``) then gets the 413 instead of a reset connection."""
        seen = 0
        while seen <= cap:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.05, t_end - loop.time()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    def _authorised(self, headers: Dict[str, str]) -> bool:
        cands = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            cands.append(auth[7:].strip())
        if "x-api-token" in headers:
            cands.append(headers["x-api-token"].strip())
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "cbir_token":
                from urllib.parse import unquote

                cands.append(unquote(v))
        return any(hmac.compare_digest(c.encode(), self.token) for c in cands)


# ----------------------------------------------------------------------------------------------- the app


def create_app(cfg: ServeConfig):
    """The FastAPI application serving ``cfg.indexes`` (opened here: a bad index folder raises :class:`CbirError`)."""
    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import FileResponse

    service = Service(cfg)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    docs_assets = _docs_assets()
    app = FastAPI(title="cbir", version=__version__, lifespan=lifespan, redoc_url=None,
                  docs_url=None if docs_assets else "/docs",
                  description="Content-based image retrieval: upload an image, get the gallery images that look like it. "
                              "Errors are JSON {\"error\", \"status\"}.")
    app.state.service = service
    static = {name: (_package_file(name), media) for name, media in STATIC_FILES.items()}
    page = _package_file("index.html")

    # -- errors as JSON
    def json_error(status: int, message: str, headers: Optional[Dict[str, str]] = None, **extra: Any) -> JSONResponse:
        return JSONResponse(_error_body(status, message, **extra), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return json_error(e.status, e.message, e.headers, **e.extra)

    @app.exception_handler(DecodeError)
    async def _decode_error(request, e: DecodeError):
        return json_error(decode_status(e.cause), str(e), cause=e.cause)

    @app.exception_handler(CbirError)
    async def _cbir_error(request, e: CbirError):
        from ..index.store import Locked

        if isinstance(e, Locked):  # another process (a CLI update, a build) is writing this index: a conflict, not bad input
            return json_error(409, str(e), {"Retry-After": "5"})
        status = 500 if isinstance(e, (IndexMismatch, IndexDamaged)) else 400
        return json_error(status, str(e))

    @app.exception_handler(Busy)
    async def _busy(request, e: Busy):
        return json_error(503, str(e), {"Retry-After": str(e.retry_after)})

    @app.exception_handler(TimedOut)
    async def _timed_out(request, e: TimedOut):
        return json_error(504, str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):
        msg = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
        if e.status_code == 404 and msg == "Not Found":
            msg = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif e.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path} (see /docs)"
        elif e.status_code == 400 and "parsing the body" in msg:
            msg = ("the request body is not valid multipart/form-data; send the image as a file field, "
                   "e.g. curl -F image=@photo.jpg URL")
        return json_error(e.status_code, msg, getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        parts = []
        for err in e.errors():
            loc = [str(x) for x in err.get("loc", ())]
            where = (f"{loc[0]} field {'.'.join(loc[1:])!r}" if len(loc) > 1 else (loc[0] if loc else "request"))
            if loc[:1] == ["body"] and err.get("type") == "missing":
                parts.append(f"missing form field {'.'.join(loc[1:])!r} (send multipart/form-data, e.g. curl -F "
                             f"{loc[-1]}=@photo.jpg)")
            elif loc[:1] == ["body"] and "UploadFile" in str(err.get("msg", "")) + str(err.get("type", "")):
                parts.append(f"form field {'.'.join(loc[1:])!r} must be a file upload, not text (curl -F {loc[-1]}=@photo.jpg)")
            else:
                parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return json_error(422, "; ".join(parts) or "invalid request")

    # -- helpers
    def deadline_left(request: Request) -> float:
        return float(request.scope.get("cbir.deadline", time.monotonic() + cfg.timeout_s)) - time.monotonic()

    def read_upload(upload: Optional[UploadFile], field_name: str, request: Request) -> Tuple[bytes, str]:
        if upload is None or not hasattr(upload, "read"):
            ctype = request.headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                raise ApiError(415 if ctype else 400, f"expected multipart/form-data with a file field {field_name!r} "
                                                      f"(got Content-Type {ctype or 'none'}); e.g. curl -F {field_name}=@photo.jpg URL")
            raise ApiError(422, f"missing form field {field_name!r} (e.g. curl -F {field_name}=@photo.jpg URL)")
        label = f"upload {_clip(upload.filename or field_name)!r}"
        data = upload.file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            raise ApiError(413, f"{label}: file too large (over {cfg.max_upload_bytes:,} bytes, the limit of this service)")
        if not data:
            raise DecodeError(label, "empty file (0 bytes)")
        return data, label

    def decode_upload(data: bytes, label: str, max_side: Optional[int]) -> np.ndarray:
        from ..data import decode_bytes

        return decode_bytes(data, name=label, max_side=max_side)

    def gallery_row(loaded: Loaded, name: str) -> int:
        row = loaded.index.row(name)
        if row is None:
            raise ApiError(404, f"no image named {_clip(name)!r} in index {loaded.name!r}")
        return int(row)

    def gallery_path(loaded: Loaded, row: int) -> Path:
        return Path(str(loaded.index.paths[row]))  # recorded by the index at build time, never taken from the request

    def urls(loaded: Loaded, name: str) -> Dict[str, str]:
        q = f"?index={quote(loaded.name)}" if len(service.slots) > 1 else ""
        n = quote(name, safe="/")
        return {"image": f"/images/{n}{q}", "thumb": f"/thumbs/{n}{q}"}

    def label_filter(loaded: Loaded, label: Optional[str]):
        if label is None or label == "":
            return None
        idx = loaded.index
        names = loaded.manifest.get("label_names") or {}
        keys = {label} | {k for k, v in names.items() if v == label}
        known = set(loaded.manifest.get("labels") or []) | set(names)
        if not keys & known:
            some = sorted(known)[:10]
            raise ApiError(400, f"no image of index {loaded.name!r} has label {_clip(label)!r}; labels: "
                                f"{', '.join(some) if some else '(none: the index has no labels)'}" + (" ..." if len(known) > 10 else ""))
        labels = idx.labels
        return lambda r: labels[r] in keys

    def expand_conf(expand: Optional[bool], qe_k: Optional[int]) -> Any:
        """The graph stage of a request: the index's own (as `cbir query` does) unless the request asks otherwise:
        ``expand=false`` plain top-k, ``expand=true`` / ``qe_k`` alpha-QE with that many results."""
        if expand is None and not qe_k:
            return "index"
        if expand is False and not qe_k:
            return None
        from ..index.expansion import DEFAULT_ALPHA, DEFAULT_QE_K

        return {"qe_k": int(qe_k or DEFAULT_QE_K), "alpha": DEFAULT_ALPHA, "dba_k": 0}

    def ranked(loaded: Loaded, vec: np.ndarray, top_k: int, keep, expand: Optional[Dict[str, Any]], exclude: Optional[int]):
        """(row, score) pairs, best first: the top ``top_k`` of the gallery passing ``keep`` (None: all)."""
        idx = loaded.index
        n = len(idx)
        try:
            search = loaded.searcher(expand)
        except CbirError as e:
            raise ApiError(400, str(e)) from None
        ex = None if exclude is None else np.array([exclude])
        want = min(n, top_k + (0 if exclude is None else 1))
        k = want if keep is None else min(n, max(4 * top_k, 64))
        while True:
            scores, rows = search(vec, max(1, k), exclude=ex)
            pairs = [(int(r), float(s)) for s, r in zip(scores[0], rows[0]) if r >= 0 and r != exclude and (keep is None or keep(int(r)))]
            if len(pairs) >= top_k or k >= n:
                return pairs[:top_k]
            k = min(n, k * 4)

    def rerank_matcher(loaded: Loaded, rerank: Optional[str]) -> Optional[str]:
        if rerank is None or rerank.lower() in ("", "0", "false", "no", "off"):
            return None
        feats = loaded.local_features
        if not feats:
            raise ApiError(400, f"index {loaded.name!r} holds no local features, so it cannot be re-ranked; "
                                "rebuild it with --local FEATURES (e.g. --local xfeat)")
        named, matchers = _rerankers()
        if rerank.lower() in ("1", "true", "yes", "on"):
            return "default" if "default" in named else _DEFAULT_MATCHER.get(feats, "mnn")
        if rerank not in named and rerank not in matchers:
            raise ApiError(400, f"rerank: unknown re-ranker {_clip(rerank)!r}; one of: true, {', '.join(named + matchers)}")
        return rerank

    def answer(loaded: Loaded, pairs, inliers: Optional[Dict[int, int]] = None, verified: Optional[Dict[int, bool]] = None) -> List[Dict[str, Any]]:
        out = []
        for rank, (r, s) in enumerate(pairs, 1):
            res = loaded.index.result(r, s, rank)
            res.pop("path", None)  # the server's file system is nobody's business
            res.update(urls(loaded, res["name"]))
            if inliers is not None and r in inliers and inliers[r] >= 0:  # as `cbir query --rerank` reports them
                res["inliers"] = int(inliers[r])
                res["verified"] = bool(verified[r])
            out.append(res)
        return out

    def search_with(request: Request, loaded: Loaded, vec: np.ndarray, top_k: int, label: Optional[str], expand: Optional[Dict[str, Any]],
                    rerank: Optional[str], rerank_top: int, query_views, exclude: Optional[int], seconds: Dict[str, float]):
        """Rank (and optionally re-rank) for one query vector; ``query_views()`` gives the re-ranker's query."""
        keep = label_filter(loaded, label)
        matcher = rerank_matcher(loaded, rerank)
        t = time.perf_counter()
        if matcher is None:
            pairs = ranked(loaded, vec, top_k, keep, expand, exclude)
            seconds["search"] = time.perf_counter() - t
            return answer(loaded, pairs), None
        cands = ranked(loaded, vec, max(top_k, rerank_top), keep, expand, exclude)
        seconds["search"] = time.perf_counter() - t
        score = dict(cands)

        def search_rows(q, k, exclude=None):  # the graph stage with the label filter, as arrays (for verified expansion)
            got = ranked(loaded, q, k, keep, expand, None if exclude is None else int(exclude[0]))
            return np.array([[s for _, s in got]], np.float32), np.array([[r for r, _ in got]], np.int64)
        reranker, lock = loaded.reranker(matcher)

        def work():
            t0 = time.perf_counter()
            with lock:
                views = query_views(reranker)
                ids = np.array([r for r, _ in cands], np.int64)
                new = reranker.rerank_item(views, ids, top=rerank_top)
                new = reranker.expand_verified(new, vec[0], search_rows, len(ids), exclude=exclude, scores=score)
                inl = dict(reranker.last_inliers)
                # the re-ranker's own verdict where it gives one (a named re-ranker's rule), else the inlier floor
                detail = getattr(reranker, "last_results", None) or {}
                floor = int(reranker.conf["min_inliers"])
                ver = {i: bool(detail[i]["verified"]) if i in detail else n >= floor for i, n in inl.items()}
            seconds["rerank"] = time.perf_counter() - t0
            return new, inl, ver

        new, inl, ver = service.gate.run(work, deadline_left(request), "re-ranking")
        pairs = [(int(r), score[int(r)]) for r in new if int(r) >= 0][:top_k]
        return answer(loaded, pairs, inl, ver), {"matcher": matcher, "features": loaded.local_features, "top": rerank_top,
                                                  "min_inliers": int(reranker.conf["min_inliers"])}

    def finish(seconds: Dict[str, float], t0: float) -> Dict[str, float]:
        seconds["total"] = time.perf_counter() - t0
        return {k: round(v, 4) for k, v in seconds.items()}

    def check_vector(vec: np.ndarray, label: str) -> None:
        if vec.dtype.kind == "f":
            norm = float(np.linalg.norm(vec))
            if not np.isfinite(norm) or norm < 1e-12:
                raise ApiError(422, f"{label}: the image gives no usable descriptor (blank or featureless?)")

    # ------------------------------------------------------------------------------------------- routes
    top_k_q = Query(10, ge=1, le=cfg.max_top_k, description="results to return")
    rerank_q = Query(None, description="re-rank the top candidates by geometric verification: a matcher name (lighterglue, "
                                       "lightglue, mnn...) or true for the one that fits the index's local features")
    rerank_top_q = Query(cfg.rerank_top, ge=1, le=1000, description="candidates verified when re-ranking")
    label_q = Query(None, description="only results with this label")
    expand_q = Query(None, description="the graph stage: unset, the index's own (as `cbir query`); false, plain top-k; "
                                       "true, alpha query expansion (cosine indexes)")
    qe_k_q = Query(None, ge=1, le=50, description="results averaged into the query (implies expand)")
    index_q = Query(None, description="which served index (default: the first)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page_route():
        return HTMLResponse(page.decode("utf-8"))

    def asset(table, name: str, what: str, cache: str) -> Response:
        """A file of the app's own, by name from a table built at start (never a path from the request)."""
        hit = table.get(name)
        if hit is None:
            raise ApiError(404, f"no {what} {_clip(name)!r}")
        return Response(hit[0], media_type=hit[1], headers={"cache-control": cache})

    @app.get("/static/{name}", include_in_schema=False)
    def static_route(name: str):
        return asset(static, name, "static file", "no-cache")

    if docs_assets:
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/docs", include_in_schema=False)
        def docs_route():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="cbir API", swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                       swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon.png")

        @app.get("/docs-assets/{name}", include_in_schema=False)
        def docs_asset_route(name: str):
            return asset(docs_assets, name, "docs asset", "max-age=86400")

    @app.get("/health", summary="liveness: ok, and the image count of each index")
    def health():
        return {"status": "ok", "indexes": {n: len(s.current.index) for n, s in service.slots.items()},
                "queued": service.batcher.queued, "in_progress": service.inflight, "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/info", summary="the served indexes: manifest summary, labels, limits")
    def info(index: Optional[str] = index_q):
        names = [service.slot(index).name] if index else list(service.slots)
        out = {"version": __version__, "default": service.default, "indexes": {n: _summary(service.slots[n]) for n in names},
               "limits": {"max_upload_bytes": cfg.max_upload_bytes, "timeout_s": cfg.timeout_s, "queue": cfg.queue,
                          "max_batch": cfg.max_batch, "max_top_k": cfg.max_top_k},
               "match": {"features": cfg.match_features, "matcher": cfg.match_matcher},
               "allow_write": cfg.allow_write, "batches": dict(service.batcher.stats)}
        return out

    def duplicate_of(loaded: Loaded, vec: np.ndarray) -> Optional[Dict[str, Any]]:
        """The gallery image an upload is a near duplicate of: its nearest neighbour when their descriptor similarity reaches
        the threshold measured for the index's extractor (cbir/duplicates.py, descriptors alone); None otherwise."""
        from ..duplicates import THRESHOLDS

        t = THRESHOLDS.get(loaded.index.extractor_name)
        if t is None or not len(loaded.index):
            return None
        scores, rows = loaded.index.search(np.asarray(vec).reshape(1, -1), 1)
        if rows[0, 0] < 0 or float(scores[0, 0]) < t:
            return None
        name = str(loaded.index.names[int(rows[0, 0])])
        return {"name": name, "score": round(float(scores[0, 0]), 6), "threshold": t, **urls(loaded, name)}

    @app.get("/duplicates", summary="groups of exact and near-duplicate gallery images (paged; nothing is changed)")
    def duplicates(threshold: Optional[float] = Query(None, ge=-1.0, le=1.0, description="candidate similarity (default: the "
                                                     "one measured for the index's extractor)"),
                   verify: bool = Query(True, description="confirm candidate pairs with local features + RANSAC"),
                   keep: str = Query("largest", pattern="^(largest|oldest|first)$", description="largest, oldest or first"),
                   offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500), index: Optional[str] = index_q):
        from ..duplicates import find_duplicates

        loaded = service.loaded(index)
        key = (threshold, verify, keep)
        with loaded._lock:  # one computation per index version and parameters, kept for the next pages
            cache = loaded.__dict__.setdefault("duplicates", {})
            rep = cache.get(key)
        if rep is None:
            rep = find_duplicates(index=loaded.index, threshold=threshold, verify=verify, keep=keep, progress=False)
            with loaded._lock:
                cache[key] = rep
        page = [{**g, "files": [{k: v for k, v in f.items() if k != "path"} | urls(loaded, f["name"]) for f in g["files"]]}
                for g in rep["groups"][offset:offset + limit]]
        return {"index": loaded.name, "extractor": rep["extractor"], "threshold": rep["threshold"], "verify": rep["verify"],
                "keep_rule": rep["keep_rule"], "n_images": rep["n_images"], "n_groups": rep["n_groups"], "n_redundant": rep["n_redundant"],
                "offset": offset, "limit": limit, "groups": page, "seconds": rep["seconds"]}

    @app.post("/search", summary="rank the gallery for an uploaded image")
    def search(request: Request, image: Optional[UploadFile] = File(None, description="the query image (any format PIL reads)"),
               top_k: int = top_k_q, rerank: Optional[str] = rerank_q, rerank_top: int = rerank_top_q, label: Optional[str] = label_q,
               expand: Optional[bool] = expand_q, qe_k: Optional[int] = qe_k_q, index: Optional[str] = index_q):
        t0 = time.perf_counter()
        loaded = service.loaded(index)
        seconds: Dict[str, float] = {}
        data, name = read_upload(image, "image", request)
        exp = expand_conf(expand, qe_k)
        rerank_matcher(loaded, rerank)  # a bad option is refused before any work
        label_filter(loaded, label)
        img = decode_upload(data, name, loaded.index.extractor.max_side)
        seconds["decode"] = time.perf_counter() - t0
        vec, job = service.batcher.describe(loaded, img, deadline_left(request))
        seconds["queue"] = max(0.0, job.started_at - job.queued_at)
        seconds["extract"] = job.extract_s
        check_vector(vec, name)

        def views(reranker):
            side = reranker.identity.get("max_side")
            return reranker._query_views(decode_upload(data, name, int(side) if side else None))

        results, rr = search_with(request, loaded, vec, top_k, label, exp, rerank, rerank_top, views, None, seconds)
        out = {"index": loaded.name, "query": {"name": image.filename, "described_size": [int(img.shape[1]), int(img.shape[0])]},
               "results": results, "batch": job.batch, "seconds": finish(seconds, t0)}
        if rr:
            out["rerank"] = rr
        dup = duplicate_of(loaded, vec)
        if dup:
            out["duplicate_of"] = dup
        return out

    @app.get("/search/similar/{name:path}", summary="more like this: rank the gallery for one of its own images")
    def similar(request: Request, name: str, top_k: int = top_k_q, rerank: Optional[str] = rerank_q, rerank_top: int = rerank_top_q,
                label: Optional[str] = label_q, expand: Optional[bool] = expand_q, qe_k: Optional[int] = qe_k_q, index: Optional[str] = index_q):
        t0 = time.perf_counter()
        loaded = service.loaded(index)
        row = gallery_row(loaded, name)
        seconds: Dict[str, float] = {}
        vec = loaded.index.query_vectors(np.array([row]))

        def views(reranker):
            from ..data import Entry

            return reranker.query_item(Entry(name, gallery_path(loaded, row), None))

        results, rr = search_with(request, loaded, vec, top_k, label, expand_conf(expand, qe_k), rerank, rerank_top, views, row, seconds)
        q = loaded.index.result(row, 1.0, 0)
        out = {"index": loaded.name, "query": {"name": name, "label": q["label"], "label_name": q["label_name"], **urls(loaded, name)},
               "results": results, "seconds": finish(seconds, t0)}
        if rr:
            out["rerank"] = rr
        return out

    @app.get("/images/{name:path}", summary="a gallery image as stored (by its name in the index)",
             responses={200: {"content": {"image/*": {}}}})
    def image_route(name: str, index: Optional[str] = index_q):
        loaded = service.loaded(index)
        path = gallery_path(loaded, gallery_row(loaded, name))
        if not path.is_file():
            raise ApiError(404, f"the file of gallery image {_clip(name)!r} is missing (moved or deleted since the index was built)")
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if not media.startswith("image/"):
            media = "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"cache-control": "private, max-age=300"})

    @app.get("/thumbs/{name:path}", summary="a JPEG thumbnail of a gallery image", responses={200: {"content": {"image/jpeg": {}}}})
    def thumb_route(name: str, index: Optional[str] = index_q):
        from ..data import decode_image

        loaded = service.loaded(index)
        row = gallery_row(loaded, name)
        hit = loaded.thumbs.get(row)
        if hit is None:
            path = gallery_path(loaded, row)
            try:
                img = decode_image(path, max_side=cfg.thumb_side)
            except DecodeError as e:
                if "not found" in e.cause:
                    raise ApiError(404, f"the file of gallery image {_clip(name)!r} is missing (moved or deleted since the index was built)") from None
                raise ApiError(500, f"gallery image {_clip(name)!r} cannot be decoded now: {e.cause}") from None
            hit = _jpeg(img)
            loaded.thumbs.put(row, hit)
        return Response(hit, media_type="image/jpeg", headers={"cache-control": "private, max-age=300"})

    @app.post("/match", summary="match two images with local features: inliers, the fitted model and an overlay PNG")
    def match(request: Request, image0: Optional[UploadFile] = File(None, description="first image (or name0)"),
              image1: Optional[UploadFile] = File(None, description="second image (or name1)"),
              name0: Optional[str] = Query(None, description="a gallery image as the first image"),
              name1: Optional[str] = Query(None, description="a gallery image as the second image"),
              model: str = Query("homography", pattern="^(homography|affine|fundamental)$"),
              format: str = Query("json", pattern="^(json|png)$", description="png: the overlay itself"),
              with_matches: bool = Query(False, description="include the matched points and inlier flags"),
              index: Optional[str] = index_q):
        from ..data import decode_image

        t0 = time.perf_counter()
        loaded = service.loaded(index)
        side = cfg.match_side

        def side_image(upload, name: Optional[str], i: int) -> Tuple[np.ndarray, str]:
            given = upload is not None and hasattr(upload, "read")
            if given == (name is not None):
                raise ApiError(400 if given else 422, f"image {i}: give either a file field image{i} or a gallery name name{i}, "
                                                      f"not {'both' if given else 'neither'}")
            if name is not None:
                row = gallery_row(loaded, name)
                try:
                    return decode_image(gallery_path(loaded, row), max_side=side), name
                except DecodeError as e:
                    raise ApiError(404 if "not found" in e.cause else 500, f"gallery image {_clip(name)!r}: {e.cause}") from None
            data, label = read_upload(upload, f"image{i}", request)
            return decode_upload(data, label, side), upload.filename or f"image{i}"

        img0, n0 = side_image(image0, name0, 0)
        img1, n1 = side_image(image1, name1, 1)
        t_dec = time.perf_counter() - t0

        def work():
            from ..local.pair import match_images

            feats, matcher = service.matcher()
            with service._match_lock:
                return match_images(img0, img1, features=feats, matcher=matcher, model=model, max_side=None)

        res = service.gate.run(work, deadline_left(request), "matching")
        png = _overlay_png(img0, img1, res)
        if format == "png":
            return Response(png, media_type="image/png", headers={"x-inliers": str(res["n_inliers"]), "x-matches": str(res["n_matches"])})
        out = {k: res[k] for k in ("features", "matcher", "model", "image_size0", "image_size1", "n_keypoints0", "n_keypoints1",
                                   "n_matches", "n_inliers", "model_matrix")}
        out.update({"image0": n0, "image1": n1, "seconds": {**res["seconds"], "decode": round(t_dec, 4),
                                                             "total": round(time.perf_counter() - t0, 4)},
                    "overlay": "data:image/png;base64," + base64.b64encode(png).decode("ascii")})
        if with_matches:
            out.update({k: res[k] for k in ("mkpts0", "mkpts1", "inliers")})
        return out

    @app.post("/images", status_code=201, summary="add an image to the gallery (needs --allow-write)")
    def add_route(request: Request, image: Optional[UploadFile] = File(None, description="the image to add"),
                  name: Optional[str] = Form(None, description="its name in the index (default: uploads/FILENAME)"),
                  label: Optional[str] = Form(None, description="its label"), index: Optional[str] = index_q):
        from ..data import Entry
        from ..engine import add_images

        need_write()
        slot = service.slot(index)
        data, label_txt = read_upload(image, "image", request)
        img_name = check_name(name if name else "uploads/" + _safe_file_name(image.filename or "image"))
        if label is not None and (len(label) > 200 or any(ord(c) < 32 for c in label)):
            raise ApiError(400, "label: at most 200 characters, no control characters")
        fmt = _image_format(data, label_txt)  # decodes it fully: a bad upload is refused before any file is written
        if slot.get().index.row(img_name) is not None:
            raise ApiError(409, f"index {slot.name!r} already has an image named {_clip(img_name)!r}; DELETE /images/{quote(img_name)} first")
        folder = service.upload_dir(slot)
        dest = folder / (hashlib.sha256(data).hexdigest()[:32] + _FORMAT_EXT.get(fmt, ".img"))

        def work():
            with service.write_lock:
                folder.mkdir(parents=True, exist_ok=True)
                if not dest.exists():
                    tmp = dest.with_name(dest.name + f".tmp-{os.getpid()}-{threading.get_ident()}")
                    tmp.write_bytes(data)
                    os.replace(tmp, dest)
                rep = add_images(slot.folder, [Entry(img_name, dest, label or None)], progress=False, log=log.info)
                slot.check(force=True)
                return rep

        rep = service.gate.run(work, deadline_left(request), "index write")
        if rep.failures:
            raise ApiError(422, f"{label_txt}: not added: {rep.failures[0]['cause']}")
        return {"index": slot.name, "added": img_name, "count": rep.count, **urls(slot.get(), img_name), "seconds": rep.seconds}

    @app.delete("/images/{name:path}", summary="remove an image from the gallery (needs --allow-write)")
    def remove_route(request: Request, name: str, index: Optional[str] = index_q):
        from ..engine import remove_images

        need_write()
        slot = service.slot(index)
        loaded = slot.get()
        row = gallery_row(loaded, name)
        path = gallery_path(loaded, row)

        def work():
            with service.write_lock:
                rep = remove_images(slot.folder, [name], log=log.info)
                slot.check(force=True)
                # a file this service stored for POST /images goes too, unless another entry still uses it
                up = service.upload_dir(slot)
                if path.parent == up and path.is_file() and str(path) not in {str(p) for p in slot.get().index.paths}:
                    path.unlink()
                return rep

        rep = service.gate.run(work, deadline_left(request), "index write")
        return {"index": slot.name, "removed": name, "count": rep.count, "seconds": rep.seconds}

    def need_write() -> None:
        if not cfg.allow_write:
            raise ApiError(403, "this service is read-only: start it with --allow-write to add or remove images")

    def check_name(name: str) -> str:
        if not _NAME_RE.match(name) or any(p in ("", ".", "..") for p in name.split("/")) or name.strip() != name:
            raise ApiError(400, f"name {_clip(name)!r}: use letters, digits, ' ', '_', '-', '.', '/' (relative parts, no '..'), "
                                "at most 200 characters")
        return name

    return Guard(app, service)


def _rerankers() -> Tuple[List[str], List[str]]:
    """(named re-rankers, matcher names) that ``rerank=`` accepts."""
    from ..local import matcher_names

    try:
        from ..local.confs import rerank_names
    except ImportError:  # a library without named re-rankers
        return [], list(matcher_names())
    return list(rerank_names()), list(matcher_names())


_DEFAULT_MATCHER = {"xfeat": "lighterglue", "aliked": "lightglue", "aliked-n16rot": "lightglue", "disk": "lightglue",
                    "superpoint": "superglue", "sift": "mnn", "rootsift": "mnn"}


def _clip(text: Any, n: int = 120) -> str:
    s = str(text)
    return s if len(s) <= n else s[:n] + "..."


def _safe_file_name(filename: str) -> str:
    base = re.split(r"[\\/]", filename)[-1]
    base = re.sub(r"[^\w.\-]+", "_", base).strip("._") or "image"
    return base[:100]


def _image_format(data: bytes, label: str) -> str:
    """The upload's format (JPEG, PNG...) after a full decode with cbir's limits (raises DecodeError)."""
    from PIL import Image

    from ..data import decode_bytes

    decode_bytes(data, name=label, max_side=64)
    with Image.open(io.BytesIO(data)) as im:
        return str(im.format or "")


def _jpeg(img: np.ndarray, quality: int = 85) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _overlay_png(img0: np.ndarray, img1: np.ndarray, result: Dict[str, Any]) -> bytes:
    """The figure of ``cbir match --out``: matches side by side, and the warped overlay when a homography was found."""
    import cv2

    from ..local.draw import GAP, matches_panel, overlap_panel

    panels = [matches_panel(img0, img1, result)]
    if result.get("homography") is not None:
        p = overlap_panel(img0, img1, result["homography"])
        if p is not None:
            panels.append(p)
    width = max(p.shape[1] for p in panels)
    rows = []
    for p in panels:
        row = np.full((p.shape[0] + GAP, width, 3), 255, np.uint8)
        row[: p.shape[0], : p.shape[1]] = p
        rows.append(row)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.concatenate(rows)[:-GAP], cv2.COLOR_RGB2BGR))
    if not ok:
        raise CbirError("could not encode the match figure as PNG")
    return buf.tobytes()


def _summary(slot: IndexSlot) -> Dict[str, Any]:
    from ..index.backend import index_summary

    loaded = slot.current  # /info answers while a version is refused (changed in place) and says so
    m = loaded.manifest
    try:
        s = index_summary(m, loaded.folder)
    except (OSError, CbirError, KeyError, ValueError):  # the folder was replaced after this version was opened
        s = {"count": m.get("count"), "dim": m.get("dim"), "metric": m.get("metric")}
    s.pop("index", None)
    s.pop("file_bytes", None)
    labels = list(m.get("labels") or [])
    return {**s, "name": slot.name, "folder": slot.folder.name, "extractor": (m.get("extractor") or {}).get("name"),
            "created": m.get("created"), "updated": m.get("updated"), "dataset": (m.get("dataset") or {}).get("name"),
            "labels": labels, "label_names": m.get("label_names") or {}, "local_features": loaded.local_features,
            "rerank_matcher": (("default" if "default" in _rerankers()[0] else _DEFAULT_MATCHER.get(loaded.local_features, "mnn"))
                               if loaded.local_features else None),
            "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(loaded.loaded_at)), "reloads": slot.reloads,
            "reload_error": slot.reload_error, "changed_in_place": slot.changed_in_place(loaded)}


def _package_file(name: str) -> bytes:
    from importlib import resources

    return resources.files("cbir.serve").joinpath("static", name).read_bytes()


def _docs_assets() -> Dict[str, Tuple[bytes, str]]:
    """Swagger UI's files as the fastapi-offline wheel ships them (served by the app, so /docs works offline); {} without it.
    Only its files are read: the package itself is not imported."""
    import importlib.util

    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or not spec.submodule_search_locations:
        log.info("fastapi-offline is not installed: /docs loads Swagger UI from its CDN (pip install 'cbir[serve]')")
        return {}
    root = Path(list(spec.submodule_search_locations)[0]) / "static"
    out = {}
    for name, (file, media) in DOCS_ASSETS.items():
        try:
            out[name] = ((root / file).read_bytes(), media)
        except OSError:
            return {}
    return out
