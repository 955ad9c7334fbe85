"""The raw ASGI middleware in front of every route (:class:`Guard`): Host and Origin checks, the token, the body limit
(413, before reading when Content-Length says so), the upload deadline (408), the requests-in-progress bound (503), the
request deadline (504) and the security headers of every response. Each request's state lives in one
:class:`Exchange`; nothing mutable is shared between requests but the service's counters."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Dict, Optional, Tuple
from urllib.parse import unquote

from .config import DRAIN_BYTES, FORM_OVERHEAD, MB
from .errors import error_body

log = logging.getLogger("cbir.serve")

#: paths anyone may fetch without the token: the page and its script carry no data, /health says only "ok"
PUBLIC_PATHS = frozenset({"/", "/health", "/static/app.js", "/static/style.css", "/favicon.ico", "/docs", "/openapi.json",
                          "/docs-assets/swagger-ui-bundle.js", "/docs-assets/swagger-ui.css", "/docs-assets/favicon.png"})
#: paths that do no work worth bounding (served from memory)
LIGHT_PATHS = PUBLIC_PATHS | {"/info"}
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

#: (status, message, extra headers) of a request the guard answers itself
Refusal = Tuple[int, str, Optional[Dict[str, str]]]


class Exchange:
    """One HTTP request on its way through the guard: what it asked, what it sent so far, whether it holds a place
    in the queue, and the guard's own answers (which win over a late reply of the app)."""

    def __init__(self, service, scope, receive, send) -> None:
        self.svc, self.cfg = service, service.cfg
        self.loop = asyncio.get_running_loop()
        self.t_end = self.loop.time() + self.cfg.timeout_s
        scope["cbir.deadline"] = time.monotonic() + self.cfg.timeout_s
        self.headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        self.path, self.method = scope.get("path", ""), scope.get("method", "GET")
        self.client = (scope.get("client") or ("?", 0))[0]
        self.page = self.path == "/" or self.path.startswith("/static/")
        self.limit = self.cfg.max_upload_bytes * (2 if self.path == "/match" else 1) + FORM_OVERHEAD
        self.declared = self.headers.get("content-length")
        self._receive, self._send = receive, send
        self.started = self.ours = self.held = self.receiving = False
        self.got = 0

    # -- answering
    async def send(self, message) -> None:
        if self.ours:
            return  # this request was already answered here (413, 408, 504): the app's late reply is dropped
        if message["type"] == "http.response.start":
            self.started = True
            hs = list(message.get("headers") or [])
            hs += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
            if not self.path.startswith("/docs"):
                hs.append((b"x-frame-options", b"DENY"))
            if self.page:
                hs.append((b"content-security-policy", PAGE_CSP.encode()))
            message = {**message, "headers": hs}
        await self._send(message)

    async def answer(self, status: int, message: str, extra_headers: Optional[Dict[str, str]] = None) -> None:
        if self.started or self.ours:
            return
        body = json.dumps(error_body(status, message)).encode()
        hs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        hs += [(k.lower().encode(), v.encode()) for k, v in (extra_headers or {}).items()]
        await self.send({"type": "http.response.start", "status": status, "headers": hs})
        await self.send({"type": "http.response.body", "body": body})
        self.ours = True

    def too_large(self, size: str) -> str:
        return (f"upload too large: {size}; this service takes files up to {self.cfg.max_upload_bytes:,} bytes "
                f"({self.cfg.max_upload_bytes / MB:g} MB)")

    # -- before the app runs
    async def size_refusal(self) -> Optional[Refusal]:
        """400 for a Content-Length that is not a number, 413 for one over the limit (its body drained first when small
        enough, so that a client sending it all before reading gets the answer)."""
        if self.declared is None:
            return None
        try:
            n = int(self.declared)
        except ValueError:
            return 400, f"invalid Content-Length {self.declared!r}", None
        if n <= self.limit:
            return None
        cap = max(DRAIN_BYTES, 2 * self.limit)
        if "100-continue" not in self.headers.get("expect", "").lower() and n <= cap:
            await self.drain(cap)
        return 413, self.too_large(f"{n:,} bytes"), None

    def busy(self) -> Refusal:
        ra = self.svc.batcher.retry_after()
        return 503, f"busy: {self.svc.inflight} requests in progress (at most {self.cfg.queue}); retry in {ra} s", {"retry-after": str(ra)}

    def admit(self) -> Optional[Refusal]:
        """Take a place: a request with a body takes its place in the queue when the body is in (slow uploads hold none;
        each client may send only so many at once); one without a body takes it now; light paths take none."""
        light = self.path in LIGHT_PATHS or self.method in ("HEAD", "OPTIONS")
        has_body = self.method in ("POST", "PUT", "PATCH") and (self.declared not in (None, "0") or "transfer-encoding" in self.headers)
        if not light and not has_body:
            if self.svc.inflight >= self.cfg.queue:
                return self.busy()
            self.svc.inflight += 1
            self.held = True
        elif not light:
            n = self.svc.receiving.get(self.client, 0)
            if n >= self.cfg.max_receiving_per_client:
                return (503, f"busy: {self.cfg.max_receiving_per_client} uploads from {self.client} are still being received; "
                             "retry when one is done", {"retry-after": "5"})
            self.svc.receiving[self.client] = n + 1
            self.receiving = True
        self.svc.requests += 1
        return None

    def stop_receiving(self) -> None:
        if self.receiving:
            self.receiving = False
            rec = self.svc.receiving
            rec[self.client] -= 1
            if rec[self.client] <= 0:
                del rec[self.client]

    def release(self) -> None:
        self.stop_receiving()
        if self.held:
            self.held = False
            self.svc.inflight -= 1

    # -- while the app runs
    async def receive(self):
        """The app's ``receive``: bounded by the deadline (408) and the body limit (413); the whole body in, the
        request takes its place (or 503)."""
        if self.ours:
            return {"type": "http.disconnect"}
        try:
            message = await asyncio.wait_for(self._receive(), timeout=max(0.05, self.t_end - self.loop.time()))
        except asyncio.TimeoutError:
            await self.answer(408, f"the upload did not complete within the request time limit ({self.cfg.timeout_s:g} s)")
            return {"type": "http.disconnect"}
        if message["type"] != "http.request":
            self.stop_receiving()  # the client went away
            return message
        self.got += len(message.get("body", b""))
        if self.got > self.limit:
            if message.get("more_body"):
                await self.drain(max(DRAIN_BYTES, 2 * self.limit) - self.got)
            await self.answer(413, self.too_large(f"over {self.limit:,} bytes"))
            return {"type": "http.disconnect"}
        if not message.get("more_body") and self.receiving:  # the whole body is in: now it takes a place
            self.stop_receiving()
            if self.svc.inflight >= self.cfg.queue:
                await self.answer(*self.busy())
                return {"type": "http.disconnect"}
            self.svc.inflight += 1
            self.held = True
        return message

    async def drain(self, cap: int) -> None:
        """Read and drop the rest of a refused body (up to ``cap`` bytes, until the deadline): a client that sends its
        whole body before reading (no ``Expect: 100-continue``) then gets the 413 instead of a reset connection."""
        seen = 0
        while seen <= cap:
            try:
                message = await asyncio.wait_for(self._receive(), timeout=max(0.05, self.t_end - self.loop.time()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request":
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body"):
                return

    async def run(self, app, scope) -> None:
        """Run the app; past the deadline answer 504 (the work goes on in its thread and its reply is dropped)."""
        task = asyncio.ensure_future(app(scope, self.receive, self.send))

        def finished(t: asyncio.Task) -> None:
            self.release()
            if not t.cancelled() and t.exception() is not None and not self.ours:
                log.error("request %s %s failed: %r", self.method, self.path, t.exception())

        task.add_done_callback(finished)
        done, _ = await asyncio.wait({task}, timeout=max(0.05, self.t_end - self.loop.time()) + 1.0)
        if task in done:
            if task.exception() is not None and not self.ours and not self.started:
                await self.answer(500, f"internal error ({type(task.exception()).__name__}); see the server log")
            return
        await self.answer(504, f"no answer within the request time limit ({self.cfg.timeout_s:g} s)")
        task.cancel()


class Guard:
    """The ASGI app the server runs: checks who asks (:meth:`refusal`), then lets an :class:`Exchange` bound the
    request's size, time and place in the queue around the FastAPI app."""

    def __init__(self, app, service) -> None:
        self.app, self.service = app, service
        cfg = service.cfg
        self.token = cfg.token.encode() if cfg.token else None
        self.allowed_hosts = {h.lower() for h in cfg.allowed_hosts} if cfg.allowed_hosts else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        ex = Exchange(self.service, scope, receive, send)
        refused = self.refusal(ex.headers, ex.path, ex.method) or await ex.size_refusal() or ex.admit()
        if refused:
            return await ex.answer(*refused)
        await ex.run(self.app, scope)

    def refusal(self, headers: Dict[str, str], path: str, method: str) -> Optional[Refusal]:
        """421 for a Host not served here (DNS rebinding), 403 for a cross-site or opaque Origin on a write, 401
        without the token; None when the request may go on."""
        if self.allowed_hosts is not None:
            host = headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]").lower() not in self.allowed_hosts:
                return 421, f"Host {host!r} is not served here (DNS rebinding guard); use http://127.0.0.1 or http://localhost", None
        if method not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get("origin")
            if origin and origin != "null" and origin.split("://", 1)[-1].lower() != headers.get("host", "").lower():
                return 403, f"cross-origin {method} from {origin!r} refused", None
            if origin == "null":
                return 403, f"{method} from an opaque origin refused", None
        if self.token is not None and path not in PUBLIC_PATHS and not self.authorised(headers):
            return (401, "this service needs its API token: send 'Authorization: Bearer TOKEN' (or the page asks for it)",
                    {"www-authenticate": "Bearer"})
        return None

    def authorised(self, headers: Dict[str, str]) -> bool:
        cands = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            cands.append(auth[7:].strip())
        if "x-api-token" in headers:
            cands.append(headers["x-api-token"].strip())
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "cbir_token":
                cands.append(unquote(v))
        return any(hmac.compare_digest(c.encode(), self.token) for c in cands)
