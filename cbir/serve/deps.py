"""What routes ask FastAPI for (``Annotated[..., Depends(...)]``): the service, the served index a request names, its
upload, its time left; and the lookups of gallery images by name (never by a path from the request)."""

# no `from __future__ import annotations`: FastAPI reads these annotations at run time
import time
from pathlib import Path
from typing import Annotated, Optional, Tuple

import numpy as np
from fastapi import Depends, Query, Request, UploadFile

from ..errors import DecodeError
from .errors import ApiError, clip
from .service import Service
from .state import IndexSlot, Loaded


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
#: ``?index=NAME``: which served index (default: the first)
IndexName = Annotated[Optional[str], Query(description="which served index (default: the first)")]


def get_slot(service: ServiceDep, index: IndexName = None) -> IndexSlot:
    return service.slot(index)


def get_loaded(service: ServiceDep, index: IndexName = None) -> Loaded:
    """The version of the named index to answer from (503 while its files were changed in place)."""
    return service.loaded(index)


SlotDep = Annotated[IndexSlot, Depends(get_slot)]
LoadedDep = Annotated[Loaded, Depends(get_loaded)]


def deadline_left(request: Request) -> float:
    """Seconds left of the request's time limit (set by the guard)."""
    cfg = request.app.state.service.cfg
    return float(request.scope.get("cbir.deadline", time.monotonic() + cfg.timeout_s)) - time.monotonic()


def read_upload(upload: Optional[UploadFile], field_name: str, request: Request) -> Tuple[bytes, str]:
    """The bytes of a file field (413 over the limit, 415/422 when it is not a file field) and its label for messages."""
    limit = request.app.state.service.cfg.max_upload_bytes
    if upload is None or not hasattr(upload, "read"):
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            raise ApiError(415 if ctype else 400, f"expected multipart/form-data with a file field {field_name!r} "
                                                  f"(got Content-Type {ctype or 'none'}); e.g. curl -F {field_name}=@photo.jpg URL")
        raise ApiError(422, f"missing form field {field_name!r} (e.g. curl -F {field_name}=@photo.jpg URL)")
    label = f"upload {clip(upload.filename or field_name)!r}"
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"{label}: file too large (over {limit:,} bytes, the limit of this service)")
    if not data:
        raise DecodeError(label, "empty file (0 bytes)")
    return data, label


def only_files(*fields: str):
    """A dependency refusing (400) a multipart body with more files than this route takes: one in each of ``fields``
    at most (a form of 50 files is refused before the route reads any of them)."""

    async def check(request: Request) -> None:
        if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            return
        form = await request.form()  # parsed once: FastAPI's own parse, kept on the request
        files = [k for k, v in form.multi_items() if not isinstance(v, str)]
        if len(files) > len(set(files)) or len(files) > len(fields):  # (one file in a wrong field: the route says which it wants)
            extra = sorted(set(files) - set(fields))
            raise ApiError(400, f"this route takes one file in each of the fields {', '.join(fields)}; the request holds "
                                f"{len(files)} file(s)" + (f", in fields it does not take: {', '.join(clip(x, 40) for x in extra[:5])}"
                                                           if extra else ""))

    return check


def decode_upload(data: bytes, label: str, max_side: Optional[int]) -> np.ndarray:
    from ..data import decode_bytes

    return decode_bytes(data, name=label, max_side=max_side)


def gallery_row(loaded: Loaded, name: str) -> int:
    """The row of gallery image ``name`` (a name the index recorded; 404 for anything else)."""
    row = loaded.index.row(name)
    if row is None:
        raise ApiError(404, f"no image named {clip(name)!r} in index {loaded.name!r}")
    return int(row)


def gallery_path(loaded: Loaded, row: int) -> Path:
    return Path(str(loaded.index.paths[row]))  # recorded by the index at build time, never taken from the request


def missing(name: str) -> ApiError:
    return ApiError(404, f"the file of gallery image {clip(name)!r} is missing (moved or deleted since the index was built)")
