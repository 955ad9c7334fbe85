"""Extraction on a Ray cluster: a pool of actors, each loading the extractor once, decodes and describes its batches.

    rows = ray_rows(todo, ext, address="auto")          # in the driver, as batches finish (any order)
    for kind, *item in rows:
        if kind == "rows":   entries, raw = item        # raw: float32 (n, d), what ext.extract gives locally
        else:                entry, cause = item        # "error": the image could not be decoded or described

Each actor is built from the driver's extractor: its name, conf and learned state (``ext.state()``, fitted on the
driver before the distributed pass), and refuses to work unless its ``ext.key()`` equals the driver's (same config,
same weight checksums, same state). Per batch it runs what the local build runs:
``cbir.data.iter_decoded(entries, decode_side)``, then ``ext.extract([shrink(img, ext.max_side), ...])``, and, when a
batch fails with an ordinary exception, the images one by one to name the bad one (``extraction failed (...)``).
So the raw vectors equal the local build's (up to float summation order: threads, batch grouping).

Failures: an actor process that dies is restarted by Ray and its batches retried (``max_retries``), so a dead worker
costs only its batch; a batch whose actor keeps dying is split into single images, and an image that still kills its
worker is reported as an ``error`` instead of stopping the build. A :class:`CbirError` raised by the extractor (the
local build's "stop everything" errors) stops the pass here too.

``address``: ``"auto"`` connects to a running cluster (``$RAY_ADDRESS``, else one found on this machine) or starts a
private local one (``num_cpus``, default min(4, cores); on the loopback interface only); ``"local"`` always starts one;
``"ray://host:10001"`` (Ray Client) or ``"host:6379"`` connect there. The images' paths must be readable from every
node (a shared file system) and cbir with its weights installed there (the actor checks the weights' checksums).

Ray is an optional extra (``pip install 'cbir[ray]'``), imported only inside these functions.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import re
import socket
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .data import Entry
from .errors import CbirError, DecodeError
from .extractors.base import Extractor

#: CPUs a local cluster started by ``address="auto"`` gets at most (the CLI's ``--threads`` default is the same bound)
LOCAL_CPUS = 4
#: object store of a local cluster: batches of descriptors are small
LOCAL_OBJECT_STORE = 512 << 20
#: seconds to wait for the actors to load the extractor before giving up
START_TIMEOUT = 600.0
_INSTALL = "pip install 'cbir[ray]'"
_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9_.\-\[\]:]+:\d{2,5}$")


def ray_available() -> bool:
    """Whether Ray can be imported (without importing it)."""
    return importlib.util.find_spec("ray") is not None


def _ray():
    try:
        import ray
    except ImportError:
        raise CbirError(f"--ray needs Ray, which is not installed: {_INSTALL}") from None
    return ray


# ------------------------------------------------------------------------------- connecting


class RaySession:
    """Connect to (or start) a Ray cluster for the ``with`` block; what it started or connected it shuts down after.

    Inside a process that already called ``ray.init`` the existing connection is used and left open.
    ``kind``: ``"existing"``, ``"cluster"`` (connected to a running one) or ``"local"`` (started here).

    ``loopback``: talk to the cluster on 127.0.0.1 as it is. Ray turns a loopback address into the machine's network
    address before connecting (right for clusters started the usual way, which listen there); a cluster that listens on
    loopback only (the private one ``auto`` starts, or one started so) must be reached as it is. ``None``: True for a
    local cluster started here and for a running one found by ``auto`` on a loopback address, else Ray's default.
    """

    def __init__(self, address: Optional[str] = "auto", num_cpus: Optional[int] = None, loopback: Optional[bool] = None) -> None:
        self.address = "auto" if address in (None, "") else str(address)
        self.num_cpus = num_cpus
        self.loopback = loopback
        self.kind = ""
        self.owned = False
        self.connected_to: Optional[str] = None

    def __enter__(self) -> "RaySession":
        addr = self.address
        if addr not in ("auto", "local") and not _ADDRESS.match(addr):
            raise CbirError(f"--ray {addr!r}: expected auto, local, a cluster address host:port (e.g. 10.0.0.5:6379) "
                            "or a Ray Client address ray://host:10001")
        ray = _ray()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves the machine
        if ray.is_initialized():
            self.kind = "existing"
            return self
        if addr == "auto":
            found = self._detect()
            if found is None:
                self._start_local(ray)
            else:
                self._connect(ray, found, self.loopback if self.loopback is not None else _is_loopback(found))
        elif addr == "local":
            self._start_local(ray)
        else:
            self._connect(ray, addr, bool(self.loopback))
        return self

    @staticmethod
    def _detect() -> Optional[str]:
        """The running cluster ``auto`` connects to ($RAY_ADDRESS, else one of this machine), None when there is none."""
        env = os.environ.get("RAY_ADDRESS")
        if env:
            return env
        try:
            from ray._private.services import get_ray_address_from_environment as find  # private: Ray's own search
        except ImportError:  # pragma: no cover - moved in another Ray: let ray.init search
            return "auto"
        try:
            return find("auto", None)
        except ConnectionError as e:
            if "multiple" in str(e).lower():
                raise CbirError(f"several Ray clusters run on this machine: name one with --ray ADDRESS ({_one_line(e)})") from None
            return None

    @staticmethod
    def _init(ray, loopback: bool, **kw) -> None:
        with _loopback_mode(loopback):
            ray.init(logging_level=logging.ERROR, log_to_driver=False, configure_logging=True, **kw)

    def _connect(self, ray, addr: str, loopback: bool) -> None:
        try:
            self._init(ray, loopback, address=addr)
        except ConnectionError as e:
            if addr == "auto" and "could not find" in str(e).lower():
                self._start_local(ray)
                return
            raise CbirError(f"cannot connect to the Ray cluster at {addr}: {_one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - grpc errors, timeouts: one line
            raise CbirError(f"cannot connect to the Ray cluster at {addr}: {_one_line(e)}") from None
        self.kind, self.owned, self.connected_to = "cluster", True, addr

    def _start_local(self, ray) -> None:
        cpus = int(self.num_cpus or min(LOCAL_CPUS, os.cpu_count() or 1))
        try:
            self._init(ray, True, address="local", num_cpus=cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE)
        except Exception as e:  # noqa: BLE001
            raise CbirError(f"cannot start a local Ray cluster: {_one_line(e)}") from None
        self.kind, self.owned, self.connected_to = "local", True, "local"

    def cpus(self) -> float:
        """CPUs free in the cluster now (all of them when none is reported free yet)."""
        ray = _ray()
        free = float(ray.available_resources().get("CPU", 0.0))
        return free if free > 0 else float(ray.cluster_resources().get("CPU", 1.0))

    def __exit__(self, *exc) -> None:
        if self.owned:
            _ray().shutdown()
            self.owned = False


def _is_loopback(addr: str) -> bool:
    host = addr.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host == "localhost" or host == "::1" or host.startswith("127.")


class _loopback_mode:
    """Ray's own single-machine mode (as on macOS/Windows) around ``ray.init``: addresses stay on 127.0.0.1, for the
    driver and the processes it starts. Private Ray switches (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` and the constant it
    sets), best effort: skipped where they moved."""

    def __init__(self, on: bool) -> None:
        self.on = on

    def __enter__(self):
        if not self.on:
            return self
        self.env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        try:
            from ray._private import ray_constants

            self.consts, self.saved = ray_constants, ray_constants.ENABLE_RAY_CLUSTER
            ray_constants.ENABLE_RAY_CLUSTER = False
        except (ImportError, AttributeError):  # pragma: no cover
            self.consts = None
        return self

    def __exit__(self, *exc) -> None:
        if not self.on:
            return
        if self.env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = self.env
        if self.consts is not None:
            self.consts.ENABLE_RAY_CLUSTER = self.saved


# ------------------------------------------------------------------------------- the actor


class RayWorker:
    """One Ray actor: the extractor built once, batches of ``(position, path)`` decoded and described on request.

    Plain class, made a Ray actor by :func:`ray_rows` (``ray.remote(RayWorker)``), so importing this module needs no Ray.
    """

    def __init__(self, name: str, conf: Dict[str, Any], state: Dict[str, np.ndarray], key: str, threads: int,
                 decode_side: Optional[int], decode_workers: int) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (../shared/DESIGN.md, "Threads on a busy 2-core machine")
        self.failed: Optional[str] = None
        self.decode_side = decode_side
        self.decode_workers = int(decode_workers)
        self.ext = None
        try:
            from .extractors.base import make_extractor
            from .runtime import set_threads

            set_threads(int(threads))
            ext = make_extractor(name, conf)
            if state:
                ext.load_state(state)
            got = ext.key(with_state=True)
            if got != key:
                self.failed = (f"the extractor made here has key {got}, the driver's {key}: another cbir version, config "
                               f"or weight files on this node ({ext.weights()})")
            self.ext = ext
        except Exception as e:  # noqa: BLE001 - reported by info(), the driver stops with it
            self.failed = f"cannot make extractor {name!r} here: {type(e).__name__}: {e}"

    def info(self) -> Dict[str, Any]:
        node = ""
        try:
            import ray

            node = ray.get_runtime_context().get_node_id()
        except Exception:  # noqa: BLE001
            pass
        return {"pid": os.getpid(), "host": socket.gethostname(), "node_id": node, "failed": self.failed}

    def run(self, batch: List[Tuple[int, str]]) -> Dict[str, Any]:
        """``{"pos": [...], "raw": float32 (n, d) or None, "errors": [(pos, cause)], "fatal": None or message, "pid"}``."""
        out = self._run(batch)
        out["pid"] = os.getpid()
        return out

    def _run(self, batch: List[Tuple[int, str]]) -> Dict[str, Any]:
        from .data import iter_decoded

        if self.failed:
            return {"pos": [], "raw": None, "errors": [], "fatal": self.failed}
        ext = self.ext
        entries = [Entry(str(p), _path(p)) for _, p in batch]
        ok_pos: List[int] = []
        imgs: List[np.ndarray] = []
        errors: List[Tuple[int, str]] = []
        for j, _, img in iter_decoded(entries, self.decode_side, workers=self.decode_workers):
            if isinstance(img, DecodeError):
                errors.append((batch[j][0], img.cause))
            else:
                ok_pos.append(batch[j][0])
                imgs.append(_shrink(img, ext.max_side))
        if not imgs:
            return {"pos": [], "raw": None, "errors": errors, "fatal": None}
        try:
            raw = np.asarray(ext.extract(imgs), np.float32)
        except CbirError as e:
            return {"pos": [], "raw": None, "errors": errors, "fatal": str(e)}
        except Exception:  # noqa: BLE001 - as the local build: one by one, to name the image
            keep, rows = [], []
            for p, im in zip(ok_pos, imgs):
                try:
                    rows.append(np.asarray(ext.extract([im]), np.float32)[0])
                    keep.append(p)
                except Exception as err:  # noqa: BLE001
                    errors.append((p, f"extraction failed ({err})"))
            ok_pos = keep
            raw = np.stack(rows) if rows else None
        return {"pos": ok_pos, "raw": raw, "errors": errors, "fatal": None}


def _path(p: str):
    from pathlib import Path

    return Path(p)


def _shrink(img: np.ndarray, side: Optional[int]) -> np.ndarray:
    """As the engine's ``shrink``: the longer side reduced to ``side`` (never enlarged)."""
    from .data import resize_max_side

    return resize_max_side(img, side) if side else img


# ------------------------------------------------------------------------------- the driver


def _progress_fn(progress) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    if hasattr(progress, "update"):
        return lambda n: progress.update(n)
    return progress


class _Pool:
    """The driver's side of a pass: one actor per slot, the batches queued and in flight, retries and replacements.

    ``batches`` (lists of positions into ``paths``) grows when a batch that keeps killing its worker is split into
    single images; ``stats`` is filled as :func:`ray_rows` documents.
    """

    def __init__(self, ray, actor_cls, args: tuple, n_act: int, batches: List[List[int]], paths: List[str],
                 in_flight: int, max_retries: int, stats: Dict[str, Any]) -> None:
        self.ray, self.actor_cls, self.args = ray, actor_cls, args
        self.n_act, self.batches, self.paths = n_act, batches, paths
        self.in_flight, self.max_retries = max(1, int(in_flight)), int(max_retries)
        self.slots = [self.new_actor() for _ in range(n_act)]
        self.gen = [0] * n_act  # replacement count per slot: a failure of a replaced actor's batch does not replace again
        self.replaced = 0
        self.pending: Dict[Any, Tuple[int, int, int]] = {}  # ref -> (slot, generation, batch id)
        self.load = [0] * n_act
        self.queue: collections.deque = collections.deque(range(len(batches)))
        self.tries: Dict[int, int] = collections.defaultdict(int)
        self.stats = stats
        stats.update({"actors": n_act, "result_pids": [], "replaced": 0, "retried": 0})

    def new_actor(self):
        return self.actor_cls.remote(*self.args)

    def start(self, session: "RaySession", cpus_per_actor: float, info: Optional[List[Dict[str, Any]]]) -> None:
        """Wait until every actor has loaded the extractor; a :class:`CbirError` when one cannot or they do not start."""
        from ray import exceptions as rex

        t_call = time.monotonic()
        try:
            infos = self.ray.get([a.info.remote() for a in self.slots], timeout=START_TIMEOUT)
        except rex.GetTimeoutError:
            raise CbirError(f"{self.n_act} Ray worker(s) did not start within {START_TIMEOUT:.0f} s "
                            f"(free CPUs: {session.cpus():g}; each asks for {cpus_per_actor:g})") from None
        except rex.RayError as e:
            raise CbirError(f"Ray workers could not start: {_one_line(e)}") from None
        bad = next((i for i in infos if i.get("failed")), None)
        if bad is not None:
            raise CbirError(f"Ray worker on {bad['host']} (node {bad['node_id'][:12]}): {bad['failed']}")
        if info is not None:
            info[:] = [{k: v for k, v in i.items() if k != "failed"} for i in infos]
        self.stats["started_s"] = round(time.monotonic() - t_call, 3)  # actors up, extractor loaded in each

    def fill(self, s: int) -> None:
        """Queue batches on slot ``s`` up to ``in_flight``."""
        while self.load[s] < self.in_flight and self.queue:
            bid = self.queue.popleft()
            ref = self.slots[s].run.remote([(p, self.paths[p]) for p in self.batches[bid]])
            self.pending[ref] = (s, self.gen[s], bid)
            self.load[s] += 1

    def fill_all(self) -> None:
        for s in range(self.n_act):
            self.fill(s)

    def next_done(self) -> Tuple[Any, int, int, int]:
        """The next finished batch: ``(ref, slot, generation, batch id)``."""
        ready, _ = self.ray.wait(list(self.pending), num_returns=1)
        ref = ready[0]
        s, g, bid = self.pending.pop(ref)
        self.load[s] -= 1
        return ref, s, g, bid

    def lost(self, s: int, g: int, bid: int, e: BaseException) -> Optional[Tuple[int, str]]:
        """Batch ``bid`` was lost with its actor (Ray's own restarts and retries spent): the actor is replaced (once per
        generation), the batch sent again, or split into single images when it keeps failing; a single image that
        still fails is given up: ``(position, cause)``, else None."""
        self.tries[bid] += 1
        self.stats["retried"] += 1
        if g == self.gen[s]:  # replace the actor once, whatever number of its batches fail with it
            self.replaced += 1
            if self.replaced > 2 * self.n_act + 2:
                raise CbirError(f"Ray workers keep dying ({self.replaced} replaced); last: {_one_line(e)}") from None
            try:
                self.ray.kill(self.slots[s], no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            self.slots[s] = self.new_actor()
            self.gen[s] += 1
            self.stats["replaced"] = self.replaced
        batch = self.batches[bid]
        if self.tries[bid] <= max(1, self.max_retries):
            self.queue.appendleft(bid)
        elif len(batch) > 1:  # a batch that keeps killing its worker: image by image
            for p in batch:
                self.batches.append([p])
                self.queue.append(len(self.batches) - 1)
        else:
            return batch[0], f"the Ray worker died while describing it ({self.tries[bid]} tries; last: {_one_line(e)})"
        return None

    def close(self) -> None:
        for a in self.slots:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass


def ray_rows(
    todo: Sequence[Entry],
    ext: Extractor,
    address: str = "auto",
    batch_size: int = 16,
    decode_side: Optional[int] = None,
    strict: bool = False,
    progress=None,
    *,
    actors: Optional[int] = None,
    cpus_per_actor: float = 1.0,
    threads: int = 1,
    decode_workers: int = 0,
    in_flight: int = 2,
    max_retries: int = 3,
    num_cpus: Optional[int] = None,
    info: Optional[List[Dict[str, Any]]] = None,
    stats: Optional[Dict[str, Any]] = None,
) -> Iterator[tuple]:
    """Extract ``todo`` on a Ray cluster; yields ``("rows", entries, raw)`` and ``("error", entry, cause)`` as batches
    finish (any order). Every entry of ``todo`` is yielded exactly once, in one of the two.

    ``raw`` are ``ext.extract`` descriptors of images decoded at ``decode_side`` and shrunk to ``ext.max_side`` (the
    local build's, see the module doc); the caller applies the zero-norm check and writes row segments as it does for
    local batches. ``strict``: the first ``error`` is yielded, then the pass stops (a caller that goes on gets a
    :class:`CbirError`). ``progress``: an object with ``update(n)`` (a bar) or a callable, told of every entry done.

    ``actors``: how many (default: the cluster's free CPUs / ``cpus_per_actor``, at most one per batch), each with
    ``threads`` torch/OpenCV threads and ``decode_workers`` decoding threads (0: in its own thread); ``in_flight``
    batches queued per actor; ``max_retries``: Ray's restarts of a dead actor and retries of its batches.
    ``num_cpus``: CPUs of a local cluster started here. ``info``: a list filled with each actor's
    ``{"pid", "host", "node_id"}`` once they have started. ``stats``: a dict filled as the pass goes:
    ``result_pids`` (the actor processes that returned results: a restarted actor has a new one), ``replaced``
    (actors the driver replaced after Ray gave up on them), ``retried`` (batches the driver sent again), ``started_s``
    (seconds until every actor had loaded the extractor).
    """
    todo = list(todo)
    if int(batch_size) < 1:
        raise CbirError(f"batch_size must be positive, got {batch_size}")
    if not todo:
        return
    ray = _ray()
    from ray import exceptions as rex

    n = len(todo)
    paths = [os.path.abspath(str(e.path)) for e in todo]
    batches: List[List[int]] = [list(range(a, min(n, a + int(batch_size)))) for a in range(0, n, int(batch_size))]
    tell = _progress_fn(progress)
    failed_entry: Optional[Tuple[Entry, str]] = None

    with RaySession(address, num_cpus=num_cpus) as session:
        n_act = int(actors) if actors else max(1, int(session.cpus() // max(cpus_per_actor, 1e-3)))
        n_act = max(1, min(n_act, len(batches)))
        state = ext.state()  # passed inline: small (codebooks, centres), and an actor restart never loses it
        key = ext.key(with_state=True)
        actor_cls = ray.remote(RayWorker).options(num_cpus=cpus_per_actor, max_restarts=int(max_retries),
                                                  max_task_retries=int(max_retries))
        args = (ext.name, ext.conf, state, key, int(threads), decode_side, int(decode_workers))
        pool = _Pool(ray, actor_cls, args, n_act, batches, paths, in_flight, max_retries,
                     stats if stats is not None else {})
        st = pool.stats
        try:
            pool.start(session, cpus_per_actor, info)
            pool.fill_all()
            while pool.pending:
                ref, s, g, bid = pool.next_done()
                try:
                    res = ray.get(ref)
                except rex.RayTaskError as e:  # an exception the actor did not catch: a bug, not a bad image
                    raise CbirError(f"a Ray worker failed: {_one_line(e)}") from None
                except rex.RayError as e:  # the actor died (and Ray's own restarts / retries are spent), node lost...
                    given_up = pool.lost(s, g, bid, e)
                    if given_up is not None:
                        p, cause = given_up
                        tell(1)
                        yield "error", todo[p], cause
                        if strict:
                            failed_entry = (todo[p], cause)
                            break
                    pool.fill_all()
                    continue
                if res["fatal"]:
                    raise CbirError(res["fatal"])
                if res.get("pid") not in st["result_pids"]:
                    st["result_pids"].append(res.get("pid"))
                if res["raw"] is not None and len(res["pos"]):
                    yield "rows", [todo[p] for p in res["pos"]], np.asarray(res["raw"], np.float32)
                for p, cause in res["errors"]:
                    yield "error", todo[p], cause
                    if strict:
                        failed_entry = (todo[p], cause)
                        break
                tell(len(batches[bid]))
                if failed_entry is not None:
                    break
                pool.fill(s)
        finally:
            pool.close()
    if failed_entry is not None:
        e, cause = failed_entry
        raise CbirError(f"--strict: {e.path}: {cause}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:400]


def local_rows(todo: Sequence[Entry], ext: Extractor, batch_size: int = 16, decode_side: Optional[int] = None,
               workers: int = 2) -> Iterator[tuple]:
    """The same items as :func:`ray_rows`, computed in this process the way the local build does (a reference for
    tests and benchmarks; the build itself keeps its own loop)."""
    from .data import iter_decoded

    batch: List[Tuple[Entry, np.ndarray]] = []

    def flush():
        imgs = [_shrink(img, ext.max_side) for _, img in batch]
        try:
            raw = np.asarray(ext.extract(imgs), np.float32)
            return [("rows", [e for e, _ in batch], raw)]
        except CbirError:
            raise
        except Exception:  # noqa: BLE001
            out, keep, rows = [], [], []
            for (e, _), im in zip(batch, imgs):
                try:
                    rows.append(np.asarray(ext.extract([im]), np.float32)[0])
                    keep.append(e)
                except Exception as err:  # noqa: BLE001
                    out.append(("error", e, f"extraction failed ({err})"))
            return ([("rows", keep, np.stack(rows))] if rows else []) + out

    for _, e, img in iter_decoded(list(todo), decode_side, workers=workers):
        if isinstance(img, DecodeError):
            yield "error", e, img.cause
            continue
        batch.append((e, img))
        if len(batch) >= batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


__all__ = ["ray_rows", "local_rows", "ray_available", "RaySession", "RayWorker", "LOCAL_CPUS"]
