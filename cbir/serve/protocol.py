"""uvicorn's HTTP/1.1 protocol with a deadline on request headers: a connection that has not sent a whole request line
and headers within the request time limit is answered 408 and closed (slowloris). uvicorn times out only idle
keep-alive connections; the :class:`~cbir.serve.guard.Guard` bounds a request once its headers are in."""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` whose connections must deliver each request's headers within :attr:`header_timeout_s`
    of connecting (or of the first bytes of a next request on a kept-alive connection)."""

    header_timeout_s = 60.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._headers_deadline = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._waiting_for_headers() and not self.transport.is_closing():
            if self._headers_deadline is None:
                self._headers_deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)
        else:
            self._disarm()

    def _disarm(self) -> None:
        if self._headers_deadline is not None:
            self._headers_deadline.cancel()
            self._headers_deadline = None

    def _headers_late(self) -> None:
        self._headers_deadline = None
        if not self._waiting_for_headers() or self.transport.is_closing():
            return
        msg = f"the request headers did not arrive within the request time limit ({self.header_timeout_s:g} s)"
        body = json.dumps({"error": msg, "status": 408}).encode()
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                             b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        self.transport.close()


def header_deadline_protocol(seconds: float) -> type:
    """:class:`HeaderDeadlineProtocol` with a deadline of ``seconds`` (uvicorn's ``http=``)."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout_s": float(seconds)})
