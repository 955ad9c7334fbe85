"""``cbir serve``: the search service (FastAPI + uvicorn) and its page.

Importing this package is cheap; FastAPI loads with :func:`cbir.serve.app.create_app` (``pip install 'cbir[serve]'``).
"""

from __future__ import annotations


def create_app(config):
    """See :func:`cbir.serve.app.create_app`."""
    from .app import create_app as _create

    return _create(config)
