"""What ``cbir serve`` takes (:class:`ServeConfig`) and the service's fixed limits; no FastAPI needed to import it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..errors import CbirError

MB = 1024 * 1024
#: multipart framing and small form fields allowed on top of the file(s) in a request body
FORM_OVERHEAD = 64 * 1024
#: a refused body up to this size (or twice the limit) is read and dropped before the 413, so that clients which send
#: the whole body before reading the answer get it; a larger one is answered at once and the connection closed
DRAIN_BYTES = 64 * MB
INDEX_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass
class ServeConfig:
    """Everything ``cbir serve`` takes; the defaults are the CLI's."""

    indexes: Dict[str, str]                     # name -> index folder; the first is the default
    token: Optional[str] = None                 # required on every API call when set
    max_upload_bytes: int = 20 * MB             # per uploaded file; the request body may hold this plus FORM_OVERHEAD
    timeout_s: float = 60.0                     # a request's whole time: upload, queue, work
    queue: int = 32                             # requests in progress at once (beyond: 503) and queries waiting for the extractor;
                                                # a request holds its place once its body is received (a slow upload holds none)
    max_receiving_per_client: int = 64          # uploads one client address may be sending at once (beyond: 503)
    max_batch: int = 1                          # queries described in one extractor call (1: no batching; on 2 CPU cores
                                                # batching was no faster, slower for MobileNetV2: benchmarks/results/serve.json)
    batch_wait_s: float = 0.0                   # how long a worker waits for more queries before a batch smaller than max_batch
    workers: int = 1                            # threads running extractor batches (and heavy jobs: re-ranking, matching)
    max_top_k: int = 100
    rerank_top: int = 100                       # candidates verified per re-ranked query by default
    allow_write: bool = False                   # POST /images, DELETE /images/{name}
    upload_dir: Optional[str] = None            # where POST /images keeps files (default: INDEX.uploads beside each index)
    match_features: str = "xfeat"               # POST /match (and the page's "why?" overlay)
    match_matcher: str = "lighterglue"
    match_side: int = 640                       # images are matched and drawn at this longer side
    reload_s: float = 1.0                       # how often the index folders are checked for a new version (0: never)
    allowed_hosts: Optional[List[str]] = None   # Host header names accepted (None: any); DNS-rebinding guard on loopback
    thumb_side: int = 256
    warm: bool = True                           # run one query at start-up so that the first request is not slower

    def check(self) -> None:
        if not self.indexes:
            raise CbirError("no index to serve: give --index DIR")
        for name in self.indexes:
            if not INDEX_NAME_RE.match(name):
                raise CbirError(f"index name {name!r}: use letters, digits, '_', '-' and '.' (at most 64), e.g. --index demo=indexes/demo")
        for what, v in (("the upload limit", self.max_upload_bytes), ("the timeout", self.timeout_s), ("the queue length", self.queue),
                        ("the batch size", self.max_batch), ("the number of workers", self.workers), ("the top-k limit", self.max_top_k)):
            if not v or v <= 0:
                raise CbirError(f"{what} must be positive, got {v}")
        if self.token is not None and len(self.token) < 16:
            raise CbirError("the API token must have at least 16 characters (e.g. python -c 'import secrets; print(secrets.token_urlsafe())')")


def is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False
