"""The gallery by name: GET /images/NAME (the file as stored), GET /thumbs/NAME, GET /duplicates, and with
--allow-write POST /images and DELETE /images/NAME. Files are opened only from paths the index recorded."""

# no `from __future__ import annotations`: FastAPI reads the route annotations
import hashlib
import logging
import mimetypes
import os
import re
import threading
from typing import Optional
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import Response
from starlette.responses import FileResponse

from ...errors import DecodeError
from ..deps import LoadedDep, ServiceDep, SlotDep, deadline_left, gallery_path, gallery_row, missing, only_files, read_upload
from ..errors import ApiError, clip
from ..render import image_format, jpeg, safe_file_name

log = logging.getLogger("cbir.serve")
router = APIRouter()

#: names accepted for new gallery images: relative, no '..' part, no control characters or backslashes
NAME_RE = re.compile(r"^[\w][\w .\-/]{0,199}$")
FORMAT_EXT = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
CACHE = {"cache-control": "private, max-age=300"}


@router.get("/images/{name:path}", summary="a gallery image as stored (by its name in the index)",
            responses={200: {"content": {"image/*": {}}}})
def image_route(name: str, loaded: LoadedDep):
    path = gallery_path(loaded, gallery_row(loaded, name))
    if not path.is_file():
        raise missing(name)
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if not media.startswith("image/"):
        media = "application/octet-stream"
    return FileResponse(path, media_type=media, headers=CACHE)


@router.get("/thumbs/{name:path}", summary="a JPEG thumbnail of a gallery image", responses={200: {"content": {"image/jpeg": {}}}})
def thumb_route(name: str, service: ServiceDep, loaded: LoadedDep):
    from ...data import decode_image

    row = gallery_row(loaded, name)
    hit = loaded.thumbs.get(row)
    if hit is None:
        try:
            img = decode_image(gallery_path(loaded, row), max_side=service.cfg.thumb_side)
        except DecodeError as e:
            if "not found" in e.cause:
                raise missing(name) from None
            raise ApiError(500, f"gallery image {clip(name)!r} cannot be decoded now: {e.cause}") from None
        hit = jpeg(img)
        loaded.thumbs.put(row, hit)
    return Response(hit, media_type="image/jpeg", headers=CACHE)


@router.get("/duplicates", summary="groups of exact and near-duplicate gallery images (paged; nothing is changed)")
def duplicates(service: ServiceDep, loaded: LoadedDep,
               threshold: Optional[float] = Query(None, ge=-1.0, le=1.0, description="candidate similarity (default: the "
                                                  "one measured for the index's extractor)"),
               verify: bool = Query(True, description="confirm candidate pairs with local features + RANSAC"),
               keep: str = Query("largest", pattern="^(largest|oldest|first)$", description="largest, oldest or first"),
               offset: int = Query(0, ge=0), limit: int = Query(50, ge=1, le=500)):
    rep = loaded.memo(("duplicates", threshold, verify, keep), lambda: _find_duplicates(loaded, threshold, verify, keep))
    page = [{**g, "files": [{k: v for k, v in f.items() if k != "path"} | service.urls(loaded, f["name"]) for f in g["files"]]}
            for g in rep["groups"][offset:offset + limit]]
    return {"index": loaded.name, "extractor": rep["extractor"], "threshold": rep["threshold"], "verify": rep["verify"],
            "keep_rule": rep["keep_rule"], "n_images": rep["n_images"], "n_groups": rep["n_groups"], "n_redundant": rep["n_redundant"],
            "offset": offset, "limit": limit, "groups": page, "seconds": rep["seconds"]}


def _find_duplicates(loaded, threshold, verify, keep):
    from ...duplicates import find_duplicates

    return find_duplicates(index=loaded.index, threshold=threshold, verify=verify, keep=keep, progress=False)


@router.get("/sample", summary="a few gallery images spread over the whole index (what the page shows before a query)")
def sample(service: ServiceDep, loaded: LoadedDep, n: int = Query(24, ge=1, le=200, description="how many")):
    idx = loaded.index
    count = len(idx)
    rows = sorted({int(r) for r in np.linspace(0, count - 1, min(n, count)).round()}) if count else []
    images = []
    for r in rows:
        res = idx.result(r, 0.0, 0)
        images.append({"name": res["name"], "label": res["label"], "label_name": res["label_name"], **service.urls(loaded, res["name"])})
    return {"index": loaded.name, "count": count, "images": images}


def need_write(request: Request) -> None:
    """Refuses the write routes (before anything else) unless the service runs with --allow-write."""
    if not request.app.state.service.cfg.allow_write:
        raise ApiError(403, "this service is read-only: start it with --allow-write to add or remove images")


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or any(p in ("", ".", "..") for p in name.split("/")) or name.strip() != name:
        raise ApiError(400, f"name {clip(name)!r}: use letters, digits, ' ', '_', '-', '.', '/' (relative parts, no '..'), "
                            "at most 200 characters")
    return name


@router.post("/images", status_code=201, summary="add an image to the gallery (needs --allow-write)",
             dependencies=[Depends(need_write), Depends(only_files("image"))])
def add_route(request: Request, service: ServiceDep, slot: SlotDep,
              image: Optional[UploadFile] = File(None, description="the image to add"),
              name: Optional[str] = Form(None, description="its name in the index (default: uploads/FILENAME)"),
              label: Optional[str] = Form(None, description="its label")):
    from ...data import Entry
    from ...engine import add_images

    data, label_txt = read_upload(image, "image", request)
    img_name = check_name(name if name else "uploads/" + safe_file_name(image.filename or "image"))
    if label is not None and (len(label) > 200 or any(ord(c) < 32 for c in label)):
        raise ApiError(400, "label: at most 200 characters, no control characters")
    fmt = image_format(data, label_txt)  # decodes it fully: a bad upload is refused before any file is written
    if slot.get().index.row(img_name) is not None:
        raise ApiError(409, f"index {slot.name!r} already has an image named {clip(img_name)!r}; DELETE /images/{quote(img_name)} first")
    folder = service.upload_dir(slot)
    dest = folder / (hashlib.sha256(data).hexdigest()[:32] + FORMAT_EXT.get(fmt, ".img"))

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
    return {"index": slot.name, "added": img_name, "count": rep.count, **service.urls(slot.get(), img_name), "seconds": rep.seconds}


@router.delete("/images/{name:path}", summary="remove an image from the gallery (needs --allow-write)", dependencies=[Depends(need_write)])
def remove_route(request: Request, name: str, service: ServiceDep, slot: SlotDep):
    from ...engine import remove_images

    loaded = slot.get()
    path = gallery_path(loaded, gallery_row(loaded, name))

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
