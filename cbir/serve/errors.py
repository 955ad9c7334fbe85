"""Every error of the service as JSON ``{"error": message, "status": code}``: :class:`ApiError` and the handlers that
:func:`install` puts on an app (cbir's errors, the queue's :class:`~cbir.serve.state.Busy` and
:class:`~cbir.serve.state.TimedOut`, FastAPI's own 404/405/422)."""

import json
from typing import Any, Dict, Optional

from ..errors import CbirError, DecodeError, IndexDamaged, IndexMismatch
from .state import Busy, TimedOut


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: Optional[Dict[str, str]] = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.extra = int(status), message, headers or {}, extra


def clip(text: Any, n: int = 120) -> str:
    """``text`` cut to ``n`` characters (names and labels quoted in messages)."""
    s = str(text)
    return s if len(s) <= n else s[:n] + "..."


def error_body(status: int, message: str, **extra: Any) -> Dict[str, Any]:
    return {"error": message, "status": int(status), **extra}


def decode_status(cause: str) -> int:
    """HTTP status of an unreadable upload, from :class:`DecodeError`'s cause."""
    c = cause.lower()
    if "too large" in c or "budget" in c:
        return 413
    if c.startswith("not an image"):
        return 415
    return 400  # empty, truncated, corrupt, too small


def json_error(status: int, message: str, headers: Optional[Dict[str, str]] = None, **extra: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse(error_body(status, message, **extra), status_code=status, headers=headers)


async def _api_error(request, e: ApiError):
    return json_error(e.status, e.message, e.headers, **e.extra)


async def _decode_error(request, e: DecodeError):
    return json_error(decode_status(e.cause), str(e), cause=e.cause)


async def _cbir_error(request, e: CbirError):
    from ..index.folder import Locked

    if isinstance(e, Locked):  # another process (a CLI update, a build) is writing this index: a conflict, not bad input
        return json_error(409, str(e), {"Retry-After": "5"})
    return json_error(500 if isinstance(e, (IndexMismatch, IndexDamaged)) else 400, str(e))


async def _busy(request, e: Busy):
    return json_error(503, str(e), {"Retry-After": str(e.retry_after)})


async def _timed_out(request, e: TimedOut):
    return json_error(504, str(e))


async def _http_error(request, e):
    msg = e.detail if isinstance(e.detail, str) else json.dumps(e.detail)
    if e.status_code == 404 and msg == "Not Found":
        msg = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
    elif e.status_code == 405:
        msg = f"{request.method} is not allowed on {request.url.path} (see /docs)"
    elif e.status_code == 400 and "parsing the body" in msg:
        msg = ("the request body is not valid multipart/form-data; send the image as a file field, "
               "e.g. curl -F image=@photo.jpg URL")
    return json_error(e.status_code, msg, getattr(e, "headers", None))


def validation_message(errors) -> str:
    """One line for FastAPI's validation errors (a missing or mistyped field, a parameter out of range)."""
    parts = []
    for err in errors:
        loc = [str(x) for x in err.get("loc", ())]
        where = (f"{loc[0]} field {'.'.join(loc[1:])!r}" if len(loc) > 1 else (loc[0] if loc else "request"))
        if loc[:1] == ["body"] and err.get("type") == "missing":
            parts.append(f"missing form field {'.'.join(loc[1:])!r} (send multipart/form-data, e.g. curl -F "
                         f"{loc[-1]}=@photo.jpg)")
        elif loc[:1] == ["body"] and "UploadFile" in str(err.get("msg", "")) + str(err.get("type", "")):
            parts.append(f"form field {'.'.join(loc[1:])!r} must be a file upload, not text (curl -F {loc[-1]}=@photo.jpg)")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _invalid(request, e):
    return json_error(422, validation_message(e.errors()))


def install(app) -> None:
    """Put the JSON error handlers on ``app``."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    for kind, handler in ((ApiError, _api_error), (DecodeError, _decode_error), (CbirError, _cbir_error), (Busy, _busy),
                          (TimedOut, _timed_out), (StarletteHTTPException, _http_error), (RequestValidationError, _invalid)):
        app.add_exception_handler(kind, handler)
