"""The service's routes, one :class:`fastapi.APIRouter` per concern: ``search`` (POST /search, GET /search/similar),
``gallery`` (its images, thumbnails, writes and duplicates), ``match`` (POST /match), ``pages`` (the page, its files,
the docs, /health and /info)."""
