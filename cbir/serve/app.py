"""The HTTP service: FastAPI routes over :mod:`cbir.engine`, and the page at ``/``.

    from cbir.serve.app import ServeConfig, create_app
    app = create_app(ServeConfig(indexes={"demo": "indexes/demo"}))     # then uvicorn.run(app) or TestClient(app)

Every error is JSON ``{"error": message, "status": code}`` (``cause`` too for an unreadable upload). Files are only
ever opened from what the index recorded (gallery images by name) or from the package itself (the page); no
request names a path. Limits: body size (413), decoded pixels (``cbir.data.set_limits``), a deadline per request
(408 for a slow upload, 504 for slow work), a bounded number of requests in progress and of queued queries
(503 with ``Retry-After``), and an API token when one is configured (401).

The parts: :mod:`.config` (what it takes), :mod:`.service` (the state behind the routes), :mod:`.guard` (the ASGI
middleware: who may ask, how much, how long), :mod:`.errors` (JSON errors), :mod:`.deps` (what routes depend on),
:mod:`.routes` (one router per concern), :mod:`.render` (thumbnails, overlays, summaries), :mod:`.state` (opened
indexes, the batcher). Importing this module needs no FastAPI; :func:`create_app` does.
"""

from contextlib import asynccontextmanager

from .config import MB, ServeConfig, is_loopback  # noqa: F401 - the public names of cbir.serve.app
from .errors import ApiError, decode_status  # noqa: F401
from .service import Service

DESCRIPTION = ("Content-based image retrieval: upload an image, get the gallery images that look like it. "
               "Errors are JSON {\"error\", \"status\"}.")


def create_app(cfg: ServeConfig):
    """The application serving ``cfg.indexes`` (opened here: a bad index folder raises :class:`CbirError`): FastAPI
    behind the :class:`~cbir.serve.guard.Guard`, whose ``service`` is the :class:`Service`."""
    from fastapi import FastAPI

    from .. import __version__
    from .errors import install
    from .guard import Guard
    from .routes import gallery, match, pages, search

    service = Service(cfg)

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        try:
            yield
        finally:
            service.stop()

    docs = pages.docs_assets()
    app = FastAPI(title="cbir", version=__version__, lifespan=lifespan, redoc_url=None, docs_url=None if docs else "/docs",
                  description=DESCRIPTION)
    app.state.service = service
    app.state.page, app.state.static = pages.page_assets()
    app.state.docs_assets = docs
    install(app)
    app.include_router(pages.router)
    if docs:
        app.include_router(pages.docs_router)
    for r in (gallery.router, search.router, match.router):
        app.include_router(r)
    return Guard(app, service)
