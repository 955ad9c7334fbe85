"""What the service keeps warm between requests: opened indexes (swapped when their folder is replaced) and the
batcher that runs queries of concurrent requests through the extractor together.

Nothing here knows HTTP: :mod:`cbir.serve.errors` turns :class:`Busy` into 503, :class:`TimedOut` into 504 and
:class:`~cbir.errors.CbirError` into 4xx JSON.
"""

from __future__ import annotations

import collections
import json
import contextlib
import logging
import math
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from ..errors import CbirError

log = logging.getLogger("cbir.serve")

#: the index folder's manifest: a rebuild, ``cbir index add`` / ``remove`` replace the folder, and with it this file
MANIFEST = "manifest.json"


class Busy(Exception):
    """The bounded queue is full: the caller should answer 503 with ``Retry-After: retry_after``."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = int(retry_after)


class TimedOut(Exception):
    """The request's time ran out while its work waited or ran (504)."""


# ----------------------------------------------------------------------------------------------- one opened index


class LRUBytes:
    """A small thread-safe LRU of ``bytes`` values bounded by their total size (thumbnails)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = int(limit_bytes)
        self._d: "collections.OrderedDict[Any, bytes]" = collections.OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key) -> Optional[bytes]:
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
            return v

    def put(self, key, value: bytes) -> None:
        if len(value) > self.limit:
            return
        with self._lock:
            if key in self._d:
                self._size -= len(self._d.pop(key))
            self._d[key] = value
            self._size += len(value)
            while self._size > self.limit and self._d:
                _, old = self._d.popitem(last=False)
                self._size -= len(old)


def _stamp(folder: Path) -> Optional[Tuple[int, tuple]]:
    """Identity of the folder (inode) and of every file in it now (name, inode, mtime, size); None while the manifest is
    missing (mid-swap). A rebuild or an update replaces the folder (another inode); files copied over it in place keep the
    folder's inode but change the files' stamps."""
    # one open folder for the inode and the listing: by path, a swap between the two would pair the old folder's inode
    # with the new folder's files, which reads as files changed in place
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None
    try:
        fst = os.fstat(fd)
        os.stat(MANIFEST, dir_fd=fd)
        files = []
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            with contextlib.suppress(FileNotFoundError):
                st = e.stat(follow_symlinks=False)
                files.append((e.name, int(st.st_ino), int(st.st_mtime_ns), int(st.st_size)))
    except OSError:
        return None
    finally:
        os.close(fd)
    return (int(fst.st_ino), tuple(files))


class Loaded:
    """One version of an index folder, opened and with its extractor built: what a request works with from start to
    end, even when the folder is replaced meanwhile (the next requests get the new version)."""

    def __init__(self, name: str, folder: Path, index, stamp, thumb_cache_bytes: int = 32 << 20) -> None:
        self.name = name
        self.folder = folder
        self.index = index
        self.stamp = stamp
        self.loaded_at = time.time()
        self.thumbs = LRUBytes(thumb_cache_bytes)
        self._rerankers: Dict[str, Any] = {}
        self._searchers: Dict[str, Any] = {}
        self._memo: Dict[Any, Any] = {}
        self._lock = threading.Lock()

    @property
    def manifest(self) -> Dict[str, Any]:
        return self.index.manifest

    @property
    def local_features(self) -> Optional[str]:
        return (self.manifest.get("local") or {}).get("name")

    def describe(self, images: List[np.ndarray]) -> np.ndarray:
        """Index-side vectors of decoded query images (one row each)."""
        _, vectors = self.index.describe_images(images)
        return vectors

    def searcher(self, expand: Any = "index"):
        """The index's search stage for ``expand`` (cbir/index/expansion.py), built once per index version: its gallery
        graph (DBA vectors, k-NN lists) is made on first use and then only read, by any number of requests at once."""
        key = json.dumps(expand, sort_keys=True)
        with self._lock:
            hit = self._searchers.get(key)
            if hit is None:
                hit = self._searchers[key] = self.index.searcher(expand)
            return hit

    def reranker(self, matcher: str):
        """The :class:`~cbir.local.rerank.Reranker` for ``matcher``, built once per index version (the matcher's models
        are loaded once); its :meth:`~cbir.local.rerank.Reranker.rerank_query` keeps no per-query state, so any number
        of requests use it at once."""
        with self._lock:
            hit = self._rerankers.get(matcher)
            if hit is None:
                from ..local.rerank import Reranker

                hit = self._rerankers[matcher] = Reranker(self.index, matcher)
            return hit

    def memo(self, key, make: Callable[[], Any]) -> Any:
        """``make()`` once per index version and ``key`` (e.g. a duplicates report), kept for the next requests."""
        with self._lock:
            hit = self._memo.get(key)
        if hit is None:
            hit = make()
            with self._lock:
                self._memo[key] = hit
        return hit


def open_index(name: str, folder: Path, previous: Optional[Loaded] = None, warm: bool = True) -> Loaded:
    """Open ``folder`` as a :class:`Loaded`; the extractor of ``previous`` is kept when the new manifest records the
    same extractor (same configuration, learned state and weights), so a swap after ``index add`` reloads no model."""
    from ..engine import load_index

    stamp = _stamp(folder)
    idx = load_index(folder)
    if previous is not None:
        idx.adopt_extractor(previous.index)  # the same extractor exactly (Index builds it lazily otherwise)
    ext = idx.extractor  # builds the models now, not in the first request
    if warm:
        try:  # the first forward pass of a network is slower: pay it at start-up
            side = min(int(ext.max_side or 256), 256)
            rng = np.random.default_rng(0)
            idx.describe_images([rng.integers(0, 256, (side, side, 3), dtype=np.uint8)])
        except Exception as e:  # noqa: BLE001 - warming up is an optimisation only
            log.warning("%s: warm-up query failed (%s)", folder, e)
    loaded = Loaded(name, folder, idx, stamp)
    if warm:
        try:  # the index's graph stage (DBA vectors, k-NN lists) is made now, not in the first request
            loaded.searcher("index")
        except CbirError as e:
            log.warning("%s: its graph stage could not be prepared (%s)", folder, e)
    return loaded


def _close_files(loaded: Loaded) -> None:
    """Close the HDF5 files an opened version reads lazily (descriptors, codes)."""
    from ..index.rows import LazyRows

    for v in list(vars(loaded.index).values()):
        if isinstance(v, LazyRows):
            v.close()


class IndexSlot:
    """A named index folder and the version of it being served; :meth:`check` swaps in a new version when the
    folder's manifest changed (a rebuild, ``index add`` / ``remove``, a copy put in place), keeping the old one if
    the new one does not open (the cause is kept in ``reload_error``)."""

    def __init__(self, name: str, folder: os.PathLike, warm: bool = True) -> None:
        self.name = name
        self.folder = Path(folder)
        self.warm = warm
        self.current = open_index(name, self.folder, warm=warm)
        self.reloads = 0
        self.reload_error: Optional[str] = None
        self._failed: Optional[tuple] = None
        self._lock = threading.Lock()

    def get(self) -> Loaded:
        """The version to serve; :class:`Busy` while the files it reads were changed in place (copied over) and the new
        content is not opened yet: answering from overwritten files gives wrong results or errors."""
        cur = self.current
        if self.changed_in_place(cur):
            raise Busy(f"index {self.name!r}: the files of its folder were changed in place while it was served; the new "
                       f"version is being opened (reload error: {self.reload_error or 'none yet'}); retry shortly — replace an "
                       "index folder as a whole (cbir index build --out, or a copy renamed into place)", 2)
        return cur

    def changed_in_place(self, cur: Optional[Loaded] = None) -> bool:
        """Whether the files ``cur`` (default: the current version) was opened from changed under the same folder."""
        cur = cur or self.current
        now = _stamp(self.folder)
        return cur.stamp is not None and now is not None and now[0] == cur.stamp[0] and now != cur.stamp

    def check(self, force: bool = False) -> bool:
        """Reload when the folder's files changed (or ``force``); True when a new version is now served."""
        with self._lock:
            stamp = _stamp(self.folder)
            if stamp is None:  # the folder is being replaced, or an update died between its two renames
                from ..index.folder import recover

                try:
                    recover(self.folder, wait_s=0)
                except CbirError as e:
                    log.info("index %s: %s", self.name, e)
                return False  # look again at the next check
            if not force and (stamp == self.current.stamp or stamp == self._failed):
                return False
            if self.changed_in_place(self.current):  # its files were rewritten under it: it is not served any more (get),
                _close_files(self.current)          # and HDF5 would hand the new reader its stale open file
            try:
                new = open_index(self.name, self.folder, previous=self.current, warm=self.warm)
            except CbirError as e:
                if _stamp(self.folder) != stamp:  # replaced again while it was read: retried at the next check
                    return False
                self._failed, self.reload_error = stamp, str(e)
                log.error("index %s: the new version of %s does not open, still serving the previous one: %s", self.name, self.folder, e)
                return False
            if new.stamp != stamp or _stamp(self.folder) != stamp:  # changed while loading: take it, check again next time
                new.stamp = None
            self.current = new  # one reference assignment: a request sees the old or the new version, never a mix
            self.reloads += 1
            self.reload_error, self._failed = None, None
            log.info("index %s: reloaded %s (%d images)", self.name, self.folder, len(new.index))
            return True


class Watcher:
    """A daemon thread that calls :meth:`IndexSlot.check` on every slot each ``interval`` seconds until stopped."""

    def __init__(self, slots: List[IndexSlot], interval: float) -> None:
        self.slots, self.interval = slots, float(interval)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        if self.interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cbir-serve-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            for s in self.slots:
                try:
                    s.check()
                except Exception:  # noqa: BLE001 - the watcher must outlive any one failure
                    log.exception("index %s: reload check failed", s.name)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


# ----------------------------------------------------------------------------------------------- the batcher


@dataclass
class Job:
    loaded: Loaded
    image: np.ndarray
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float = 0.0
    extract_s: float = 0.0
    batch: int = 0


class Batcher:
    """A bounded queue of query images and ``workers`` threads that describe them in batches.

    A worker takes the oldest job and every other waiting job of the same index version, up to ``max_batch``
    (after waiting ``wait_s`` for more when fewer are there), and runs them through the extractor in one call: under
    load, requests that arrived while a batch ran go together in the next. ``max_batch=1`` turns batching off.
    At most ``capacity`` jobs wait: :meth:`submit` raises :class:`Busy` beyond.
    """

    def __init__(self, max_batch: int = 1, capacity: int = 32, workers: int = 1, wait_s: float = 0.0) -> None:
        if max_batch < 1 or capacity < 1 or workers < 1:
            raise CbirError("the batch size, the queue length and the number of workers must be positive")
        self.max_batch, self.capacity, self.workers, self.wait_s = int(max_batch), int(capacity), int(workers), float(wait_s)
        self._q: Deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stop = False
        self._threads: List[threading.Thread] = []
        self.stats = {"batches": 0, "images": 0, "largest_batch": 0, "extract_s": 0.0, "rejected": 0, "timed_out": 0}
        self._recent: Deque[float] = collections.deque(maxlen=32)  # seconds per batch, for Retry-After

    # -- life cycle
    def start(self) -> None:
        with self._cond:
            self._stop = False
        while len(self._threads) < self.workers:
            t = threading.Thread(target=self._run, name=f"cbir-serve-batch-{len(self._threads)}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            pending = list(self._q)
            self._q.clear()
            self._cond.notify_all()
        for j in pending:
            if j.future.set_running_or_notify_cancel():  # False: its request gave up already
                j.future.set_exception(Busy("the service is shutting down", 5))
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []

    @property
    def queued(self) -> int:
        return len(self._q)

    def retry_after(self) -> int:
        per = (sum(self._recent) / len(self._recent)) if self._recent else 1.0
        return max(1, math.ceil(per * (len(self._q) / self.max_batch + 1)))

    # -- use
    def submit(self, loaded: Loaded, image: np.ndarray) -> Job:
        job = Job(loaded, image)
        with self._cond:
            if self._stop:
                raise Busy("the service is shutting down", 5)
            if len(self._q) >= self.capacity:
                self.stats["rejected"] += 1
                raise Busy(f"the query queue is full ({self.capacity} waiting); try again shortly", self.retry_after())
            self._q.append(job)
            self._cond.notify()
        return job

    def describe(self, loaded: Loaded, image: np.ndarray, timeout: float) -> Tuple[np.ndarray, Job]:
        """Queue one image and wait for its vector (raises :class:`Busy`, :class:`TimedOut` or the extractor's error)."""
        if not self._threads:
            raise Busy("the query workers are not running (the service is starting or stopping)", 2)
        job = self.submit(loaded, image)
        try:
            vec = job.future.result(timeout=max(0.0, timeout))
        except FutureTimeout:
            job.future.cancel()  # dropped if it has not started; a running batch finishes and its result is discarded
            self.stats["timed_out"] += 1
            raise TimedOut(f"no answer within the request time limit ({timeout:.0f} s left when queued behind "
                           f"{self.queued} other queries)") from None
        return vec, job

    def _take(self) -> List[Job]:
        """The next batch (empty when stopping)."""
        with self._cond:
            while not self._q and not self._stop:
                self._cond.wait(0.5)
            if self._stop:
                return []
            if self.wait_s > 0 and len(self._q) < self.max_batch:
                deadline = time.monotonic() + self.wait_s
                while len(self._q) < self.max_batch and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            batch: List[Job] = []
            first = None
            for j in list(self._q):
                if len(batch) >= self.max_batch:
                    break
                if first is None or j.loaded is first:
                    self._q.remove(j)
                    if not j.future.set_running_or_notify_cancel():
                        continue  # its request gave up (timed out)
                    first = j.loaded
                    batch.append(j)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                with self._cond:
                    if self._stop:
                        return
                continue
            t0 = time.perf_counter()
            for j in batch:
                j.started_at, j.batch = t0, len(batch)
            try:
                vectors = batch[0].loaded.describe([j.image for j in batch])
                results: List[Any] = [vectors[i: i + 1] for i in range(len(batch))]
            except BaseException:  # noqa: BLE001 - one image's failure must not fail the others: retry one by one
                results = []
                for j in batch:
                    try:
                        results.append(j.loaded.describe([j.image]))
                    except BaseException as e:  # noqa: BLE001
                        results.append(e)
            dt = time.perf_counter() - t0
            self._recent.append(dt)
            self.stats["batches"] += 1
            self.stats["images"] += len(batch)
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            self.stats["extract_s"] += dt
            for j, r in zip(batch, results):
                j.extract_s = dt
                if isinstance(r, BaseException):
                    j.future.set_exception(r)
                else:
                    j.future.set_result(r)


class WorkGate:
    """At most ``slots`` heavy jobs (re-ranking, matching, index writes) at once and at most ``capacity`` waiting for a
    slot: beyond, :class:`Busy`; a job that waits past its deadline, :class:`TimedOut`."""

    def __init__(self, slots: int = 1, capacity: int = 32) -> None:
        self._sem = threading.Semaphore(max(1, int(slots)))
        self.capacity = int(capacity)
        self._waiting = 0
        self._lock = threading.Lock()

    def run(self, fn: Callable[[], Any], timeout: float, what: str) -> Any:
        with self._lock:
            if self._waiting >= self.capacity:
                raise Busy(f"too many {what} requests waiting ({self.capacity}); try again shortly", 2)
            self._waiting += 1
        try:
            if not self._sem.acquire(timeout=max(0.0, timeout)):
                raise TimedOut(f"{what}: no worker free within the request time limit")
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            return fn()
        finally:
            self._sem.release()
