"""The state behind the routes (:class:`Service`): index slots, the batcher, the heavy-work gate, the matcher, and the
choice of a re-ranker for a request. Nothing here reads a request."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

from .config import ServeConfig
from .errors import ApiError, clip
from .state import Batcher, IndexSlot, Loaded, Watcher, WorkGate

#: the matcher that fits each kind of local features (``rerank=true`` when the library has no ``default`` re-ranker)
DEFAULT_MATCHER = {"xfeat": "lighterglue", "aliked": "lightglue", "aliked-n16rot": "lightglue", "disk": "lightglue",
                   "superpoint": "superglue", "sift": "mnn", "rootsift": "mnn"}


def rerankers() -> Tuple[List[str], List[str]]:
    """(named re-rankers, matcher names) that ``rerank=`` accepts."""
    from ..local import matcher_names
    from ..local.confs import rerank_names

    return list(rerank_names()), list(matcher_names())


def default_reranker(local_features: Optional[str]) -> Optional[str]:
    """What ``rerank=true`` uses for an index with these local features (None: it has none)."""
    if not local_features:
        return None
    return "default" if "default" in rerankers()[0] else DEFAULT_MATCHER.get(local_features, "mnn")


def rerank_matcher(loaded: Loaded, rerank: Optional[str]) -> Optional[str]:
    """The re-ranker a request's ``rerank=`` names (None: no re-ranking); 400 for one this index cannot use."""
    if rerank is None or rerank.lower() in ("", "0", "false", "no", "off"):
        return None
    feats = loaded.local_features
    if not feats:
        raise ApiError(400, f"index {loaded.name!r} holds no local features, so it cannot be re-ranked; "
                            "rebuild it with --local FEATURES (e.g. --local xfeat)")
    named, matchers = rerankers()
    if rerank.lower() in ("1", "true", "yes", "on"):
        return default_reranker(feats)
    if rerank not in named and rerank not in matchers:
        raise ApiError(400, f"rerank: unknown re-ranker {clip(rerank)!r}; one of: true, {', '.join(named + matchers)}")
    return rerank


class Service:
    """The state behind the routes: index slots, the batcher, the heavy-work gate, the matcher."""

    def __init__(self, cfg: ServeConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.slots: Dict[str, IndexSlot] = {}
        for name, folder in cfg.indexes.items():
            self.slots[name] = IndexSlot(name, folder, warm=cfg.warm)
        self.default = next(iter(self.slots))
        self.batcher = Batcher(max_batch=cfg.max_batch, capacity=cfg.queue, workers=cfg.workers, wait_s=cfg.batch_wait_s)
        self.gate = WorkGate(slots=cfg.workers, capacity=cfg.queue)
        self.watcher = Watcher(list(self.slots.values()), cfg.reload_s)
        self.write_lock = threading.Lock()
        self._match: Optional[Tuple[Any, Any]] = None
        self.match_lock = threading.Lock()  # the matcher of POST /match is built once and used by one request at a time
        self.started = time.time()
        self.inflight = 0
        self.receiving: Dict[str, int] = {}  # client address -> uploads being received
        self.requests = 0

    def start(self) -> None:
        self.batcher.start()
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.batcher.stop()

    def slot(self, index: Optional[str]) -> IndexSlot:
        name = index or self.default
        s = self.slots.get(name)
        if s is None:
            raise ApiError(404, f"no index named {name!r} is served; served: {', '.join(sorted(self.slots))}")
        return s

    def loaded(self, index: Optional[str]) -> Loaded:
        return self.slot(index).get()

    def matcher(self) -> Tuple[Any, Any]:
        """The local features + matcher of POST /match, built on first use and kept."""
        with self.match_lock:
            if self._match is None:
                from ..local import build_extractor, build_matcher

                feats = build_extractor(self.cfg.match_features)
                self._match = (feats, build_matcher(self.cfg.match_matcher, features=self.cfg.match_features))
            return self._match

    def upload_dir(self, slot: IndexSlot) -> Path:
        if self.cfg.upload_dir:
            d = Path(self.cfg.upload_dir) / slot.name if len(self.slots) > 1 else Path(self.cfg.upload_dir)
        else:
            d = slot.folder.parent / f"{slot.folder.name}.uploads"
        return d.resolve()

    def urls(self, loaded: Loaded, name: str) -> Dict[str, str]:
        """The image and thumbnail URLs of gallery image ``name``."""
        q = f"?index={quote(loaded.name)}" if len(self.slots) > 1 else ""
        n = quote(name, safe="/")
        return {"image": f"/images/{n}{q}", "thumb": f"/thumbs/{n}{q}"}
