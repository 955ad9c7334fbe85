"""The page (``/`` and its two files), the offline API docs, GET /health and GET /info. The page's files are read
from the package once, at start, and served by name from that table (never a path from the request)."""

# no `from __future__ import annotations`: FastAPI reads the route annotations
import logging
import time
from pathlib import Path
from typing import Dict, Tuple

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ... import __version__
from ..deps import IndexName, ServiceDep
from ..errors import ApiError, clip
from ..render import summary

log = logging.getLogger("cbir.serve")
router = APIRouter()
docs_router = APIRouter()  # included only when Swagger UI's files are installed (else FastAPI's own /docs, from its CDN)

STATIC_FILES = {"app.js": "application/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
#: Swagger UI 5 (OpenAPI 3.1, which FastAPI writes), from the fastapi-offline wheel: served name -> (its file, media type)
DOCS_ASSETS = {"swagger-ui-bundle.js": ("swagger-ui-bundle.js", "application/javascript"), "swagger-ui.css": ("swagger-ui.css", "text/css"),
               "favicon.png": ("favicon.png", "image/png")}


def package_file(name: str) -> bytes:
    from importlib import resources

    return resources.files("cbir.serve").joinpath("static", name).read_bytes()


def page_assets() -> Tuple[bytes, Dict[str, Tuple[bytes, str]]]:
    """(the page, its static files by name) as the package ships them."""
    return package_file("index.html"), {name: (package_file(name), media) for name, media in STATIC_FILES.items()}


def docs_assets() -> Dict[str, Tuple[bytes, str]]:
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


def asset(table, name: str, what: str, cache: str) -> Response:
    """A file of the app's own, by name from a table built at start (never a path from the request)."""
    hit = table.get(name)
    if hit is None:
        raise ApiError(404, f"no {what} {clip(name)!r}")
    return Response(hit[0], media_type=hit[1], headers={"cache-control": cache})


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def page_route(request: Request):
    return HTMLResponse(request.app.state.page.decode("utf-8"))


@router.get("/static/{name}", include_in_schema=False)
def static_route(request: Request, name: str):
    return asset(request.app.state.static, name, "static file", "no-cache")


@docs_router.get("/docs", include_in_schema=False)
def docs_route():
    from fastapi.openapi.docs import get_swagger_ui_html

    return get_swagger_ui_html(openapi_url="/openapi.json", title="cbir API", swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                               swagger_css_url="/docs-assets/swagger-ui.css", swagger_favicon_url="/docs-assets/favicon.png")


@docs_router.get("/docs-assets/{name}", include_in_schema=False)
def docs_asset_route(request: Request, name: str):
    return asset(request.app.state.docs_assets, name, "docs asset", "max-age=86400")


@router.get("/health", summary="liveness: ok, and the image count of each index")
def health(service: ServiceDep):
    return {"status": "ok", "indexes": {n: len(s.current.index) for n, s in service.slots.items()},
            "queued": service.batcher.queued, "in_progress": service.inflight, "uptime_s": round(time.time() - service.started, 1)}


@router.get("/info", summary="the served indexes: manifest summary, labels, limits")
def info(service: ServiceDep, index: IndexName = None):
    cfg = service.cfg
    names = [service.slot(index).name] if index else list(service.slots)
    return {"version": __version__, "default": service.default, "indexes": {n: summary(service.slots[n]) for n in names},
            "limits": {"max_upload_bytes": cfg.max_upload_bytes, "timeout_s": cfg.timeout_s, "queue": cfg.queue,
                       "max_batch": cfg.max_batch, "max_top_k": cfg.max_top_k},
            "match": {"features": cfg.match_features, "matcher": cfg.match_matcher},
            "allow_write": cfg.allow_write, "batches": dict(service.batcher.stats)}
