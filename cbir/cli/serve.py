"""``cbir serve``: keep the models and the index warm behind HTTP.

    cbir serve --index indexes/demo                          # http://127.0.0.1:8000/ (page), /docs (API)
    cbir serve --index demo=indexes/demo --index corel=indexes/corel --host 0.0.0.0 --token "$TOKEN"

Registered by ``cbir.cli`` through :func:`register`; errors are :class:`~cbir.errors.CbirError` (one line, exit 2).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable, Dict, List

TOKEN_ENV = "CBIR_TOKEN"


def register(sub, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    from ..cliutil import non_negative_int, positive_int

    def positive_float(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return v

    s = sub.add_parser(
        "serve", help="serve searches over HTTP (JSON API + a web page), models and index kept warm",
        description="A FastAPI service: POST /search (an uploaded image), GET /search/similar/NAME, GET /images/NAME, "
        "GET /thumbs/NAME, GET /sample, POST /match, GET /health, GET /info, and with --allow-write POST /images, DELETE /images/NAME. "
        "The page is at /, the OpenAPI docs at /docs. An index folder that is replaced (rebuild, `cbir index add`) is "
        "reloaded between requests.")
    s.add_argument("--index", action="append", required=True, metavar="[NAME=]DIR",
                   help="an index folder to serve, optionally named (default name: the folder's); repeat for several, the first is the default")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only; any other needs --token)")
    s.add_argument("--port", type=non_negative_int, default=8000, help="TCP port (default: %(default)s; 0: any free port)")
    s.add_argument("--workers", type=positive_int, default=1, help="threads running extractor batches, re-ranking and matching "
                   "(default: %(default)s; each uses --threads CPU threads; one process, so the index and models are held once)")
    s.add_argument("--token", help=f"API token every request must carry (Authorization: Bearer TOKEN); default ${TOKEN_ENV}; "
                   "required when --host is not a loopback address")
    s.add_argument("--allow-write", action="store_true", help="enable POST /images and DELETE /images/NAME (they rewrite the index folder)")
    s.add_argument("--upload-dir", metavar="DIR", help="where POST /images keeps the files it adds (default: DIR.uploads beside the index)")
    s.add_argument("--max-upload-mb", type=positive_float, default=20.0, help="largest upload in MB (MiB); larger: 413 (default: %(default)s)")
    s.add_argument("--timeout", type=positive_float, default=60.0, help="seconds a request may take, upload included; then 408/504 (default: %(default)s)")
    s.add_argument("--queue", type=positive_int, default=32, help="requests in progress at once (an upload counts once its body is in); "
                   "beyond, 503 with Retry-After (default: %(default)s)")
    s.add_argument("--max-uploads-per-client", type=positive_int, default=64, dest="max_receiving_per_client", metavar="N",
                   help="uploads one client address may be sending at once; beyond, 503 (default: %(default)s)")
    s.add_argument("--max-batch", type=positive_int, default=1, help="queries of concurrent requests described in one extractor call "
                   "(default: %(default)s, no batching: on CPU it was not faster, 0.6x for MobileNetV2, see benchmarks/results/serve.json; "
                   "try 8 on a GPU)")
    s.add_argument("--batch-wait-ms", type=float, default=0.0, help="how long a batch waits for more queries when fewer than --max-batch "
                   "are queued (default: %(default)s: batches form only from queries that queued while the previous batch ran)")
    s.add_argument("--max-top-k", type=positive_int, default=100, help="largest top_k a request may ask (default: %(default)s)")
    s.add_argument("--match", default="xfeat+lighterglue", metavar="FEATURES+MATCHER",
                   help="local features and matcher of POST /match and the page's 'why?' (default: %(default)s; e.g. sift+mnn, aliked+lightglue)")
    s.add_argument("--reload-s", type=float, default=1.0, help="seconds between checks for a replaced index folder (default: %(default)s; 0: never)")
    s.add_argument("--no-warm", action="store_true", help="skip the warm-up query at start-up")
    add_common(s)
    s.set_defaults(func=cmd_serve)


def parse_indexes(items: List[str]) -> Dict[str, str]:
    """``[NAME=]DIR`` arguments -> {name: folder}; names default to the folder's name and must be unique."""
    from ..errors import CbirError

    out: Dict[str, str] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        if not sep or os.path.isdir(item) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", name):
            name, folder = Path(item).resolve().name or "index", item
        if not (Path(folder) / "manifest.json").is_file():
            raise CbirError(f"--index {item}: {folder} is not a cbir index folder (no manifest.json; build one with `cbir index build`)")
        if name in out:
            raise CbirError(f"--index {item}: two indexes named {name!r}; name them, e.g. --index a={folder}")
        out[name] = folder
    return out


def config_from_args(a):
    from ..errors import CbirError
    from ..serve.config import MB, ServeConfig, is_loopback

    token = a.token if a.token is not None else (os.environ.get(TOKEN_ENV) or None)
    if not is_loopback(a.host) and not token:
        raise CbirError(f"--host {a.host} makes the service reachable from other machines: give --token TOKEN or set ${TOKEN_ENV} "
                        "(e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")
    features, sep, matcher = a.match.partition("+")
    if not sep or not features or not matcher:
        raise CbirError(f"--match {a.match!r}: expected FEATURES+MATCHER, e.g. xfeat+lighterglue or sift+mnn")
    from ..local import validate_combination

    validate_combination(features, matcher)
    if a.batch_wait_ms < 0 or a.reload_s < 0:
        raise CbirError("--batch-wait-ms and --reload-s cannot be negative")
    return ServeConfig(
        indexes=parse_indexes(a.index), token=token, max_upload_bytes=int(a.max_upload_mb * MB), timeout_s=a.timeout, queue=a.queue,
        max_receiving_per_client=a.max_receiving_per_client,
        max_batch=a.max_batch, batch_wait_s=a.batch_wait_ms / 1000.0, workers=a.workers, max_top_k=a.max_top_k,
        allow_write=a.allow_write, upload_dir=a.upload_dir, match_features=features, match_matcher=matcher, reload_s=a.reload_s,
        allowed_hosts=["127.0.0.1", "localhost", "::1"] if is_loopback(a.host) else None, warm=not a.no_warm)


def cmd_serve(a) -> int:
    import logging

    from ..errors import CbirError

    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.protocol import header_deadline_protocol
    except ImportError as e:
        raise CbirError(f"cbir serve needs FastAPI and uvicorn ({e.name} is missing): pip install 'cbir[serve]'") from None
    cfg = config_from_args(a)
    logging.basicConfig(level=logging.WARNING if a.quiet else logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    app = create_app(cfg)
    svc = app.service
    host = f"[{a.host}]" if ":" in a.host else a.host
    for name, slot in svc.slots.items():
        m = slot.get().manifest
        print(f"index {name}: {len(slot.get().index)} images, {m['extractor']['name']} ({m['dim']}-d, {m['metric']}), {slot.folder}",
              file=sys.stderr)
    print(f"cbir serve: http://{host}:{a.port}/ (API docs: /docs){'; token required' if cfg.token else ''}"
          f"{'; writes enabled' if cfg.allow_write else ''}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning" if a.quiet else "info", access_log=not a.quiet,
                timeout_keep_alive=5, timeout_graceful_shutdown=10, server_header=False, http=header_deadline_protocol(cfg.timeout_s))
    return 0
