"""cbir.distributed on a real Ray cluster: a head and a worker node on loopback (1 CPU each), started once per session.

Rows must equal local extraction (same names, raw descriptors within 1e-5), every image must come back exactly once
even when a worker process is killed mid-run, and failures are reported per image.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO

from cbir.data import Entry
from cbir.errors import CbirError

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'cbir[ray]')")

from cbir.distributed import RaySession, RayWorker, local_rows, ray_available, ray_rows  # noqa: E402
from cbir.extractors.base import make_extractor  # noqa: E402



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(leaders):
    """Processes in the sessions of the ``ray start`` processes this fixture started (their daemons and workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getsid(int(d.name)) in leaders:
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _alive_after(pids_now, seconds: float):
    """``pids_now()`` polled until it is empty or ``seconds`` have passed; what is still alive then."""
    deadline = time.monotonic() + seconds
    alive = pids_now()
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = pids_now()
    return alive


#: ``ray`` (the CLI) with every address kept on loopback: Ray's single-machine switch for the processes a node starts,
#: its multi-node check let through, and 127.0.0.1 no longer swapped for the machine's network address
_RAY_LOOPBACK = (
    "import os, sys\n"
    "os.environ['RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER'] = '0'\n"
    "import ray._private.ray_constants as c\n"
    "c.ENABLE_RAY_CLUSTER = True\n"
    "import ray._private.services as s\n"
    "s.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "main()\n"
)


def _ray_node(args, log, env):
    return subprocess.Popen([sys.executable, "-c", _RAY_LOOPBACK, "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", "1",
                             "--disable-usage-stats", "--block"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """``ray start --head`` + ``ray start --address`` (one CPU each, on 127.0.0.1 only, no dashboard), connected through
    :class:`cbir.distributed.RaySession`; stopped at the end.

    Each ``ray start --block`` runs in its own session and is stopped by SIGTERM (it stops the processes it started);
    anything of those sessions still alive after that is killed by pid. (``ray stop`` would stop every Ray cluster of the
    machine, other users' included.)
    """
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="cbir-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    # no token auth on this throw-away loopback cluster: Ray would keep a token in ~/.ray for it
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    logs = [open(Path(tmp) / f"{n}.log", "w") for n in ("head", "worker")]
    procs = []
    session = None
    try:
        procs.append(_ray_node(["--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", tmp], logs[0], env))
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or procs[0].poll() is not None:
                    pytest.fail(f"ray head did not start: {(Path(tmp) / 'head.log').read_text()[-2000:]}")
                time.sleep(0.5)
        procs.append(_ray_node(["--address", f"127.0.0.1:{port}"], logs[1], env))
        session = RaySession(f"127.0.0.1:{port}", loopback=True).__enter__()
        while ray.cluster_resources().get("CPU", 0) < 2:
            if time.time() > deadline or procs[1].poll() is not None:
                pytest.fail(f"ray worker node did not join: {(Path(tmp) / 'worker.log').read_text()[-2000:]}")
            time.sleep(0.5)
        nodes = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
        assert nodes == ["127.0.0.1", "127.0.0.1"], nodes
        yield {"address": f"127.0.0.1:{port}", "nodes": nodes}
    finally:
        if session is not None:
            session.__exit__(None, None, None)
        elif ray.is_initialized():
            ray.shutdown()
        leaders = {p.pid for p in procs}
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for pid in _alive_after(lambda: _session_pids(leaders), 10):  # anything the nodes left behind once they had time to go
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for f in logs:
            f.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def demo_entries(demo_images):
    imgs = sorted(demo_images.glob("*.jpg"))[:18]
    assert len(imgs) == 18, f"the demo set has {len(imgs)} images in {demo_images}"
    return [Entry(p.name, p, p.name.split("_")[0]) for p in imgs]


def _collect(items):
    rows, errors = {}, {}
    for kind, *it in items:
        if kind == "rows":
            entries, raw = it
            assert raw.dtype == np.float32 and raw.shape[0] == len(entries)
            for e, r in zip(entries, raw):
                assert e.name not in rows, f"{e.name} yielded twice"
                rows[e.name] = r
        else:
            e, cause = it
            assert e.name not in errors and e.name not in rows, f"{e.name} yielded twice"
            errors[e.name] = cause
    return rows, errors


def _same(rows, ref):
    assert sorted(rows) == sorted(ref)
    worst = max(float(np.abs(rows[n] - ref[n]).max()) for n in ref)
    assert worst <= 1e-5, worst


def test_ray_is_found():
    assert ray_available()


def test_colour_equals_local_and_uses_both_nodes(ray_cluster, demo_entries):
    ext = make_extractor("colour", {})
    todo = demo_entries + [Entry("missing.jpg", Path("/nonexistent/missing.jpg"), None)]
    ref, ref_err = _collect(local_rows(todo, ext, batch_size=4, decode_side=ext.max_side))
    info, stats, done = [], {}, []
    rows, errors = _collect(ray_rows(todo, ext, address=ray_cluster["address"], batch_size=4, decode_side=ext.max_side,
                                     progress=done.append, info=info, stats=stats))
    _same(rows, ref)
    assert errors == ref_err == {"missing.jpg": "file not found"}
    assert sum(done) == len(todo)  # every entry counted once on the driver's progress
    assert len(info) == 2 and len({i["node_id"] for i in info}) == 2  # one actor on each node
    assert set(stats["result_pids"]) == {i["pid"] for i in info}


def test_default_extractor_equals_local(ray_cluster, demo_entries):
    from cbir.extractors import DEFAULT_EXTRACTOR

    ext = make_extractor(DEFAULT_EXTRACTOR, {})
    todo = demo_entries[:8]
    ref, _ = _collect(local_rows(todo, ext, batch_size=3, decode_side=ext.max_side))
    rows, errors = _collect(ray_rows(todo, ext, address=ray_cluster["address"], batch_size=3, decode_side=ext.max_side))
    assert not errors
    _same(rows, ref)


def test_learned_state_travels_to_the_actors(ray_cluster, demo_entries):
    """VLAD fitted on the driver: the actors get its codebook (their key includes the state digest)."""
    from cbir.data import iter_decoded

    ext = make_extractor("vlad", {"k": 8, "fit_images": 6, "local_conf": {"max_keypoints": 200}, "max_side": 256})
    ext.fit((img for _, _, img in iter_decoded(demo_entries[:6], ext.max_side)), n=6)
    assert ext.state()
    todo = demo_entries[:6]
    ref, _ = _collect(local_rows(todo, ext, batch_size=3, decode_side=ext.max_side))
    rows, _ = _collect(ray_rows(todo, ext, address=ray_cluster["address"], batch_size=3, decode_side=ext.max_side))
    _same(rows, ref)


def test_a_killed_worker_costs_only_its_batch(ray_cluster, demo_entries):
    ext = make_extractor("fused", {})
    todo = demo_entries[:14]
    ref, _ = _collect(local_rows(todo, ext, batch_size=2, decode_side=ext.max_side))
    info, stats, killed = [], {}, []

    def run():
        for item in ray_rows(todo, ext, address=ray_cluster["address"], batch_size=2, decode_side=ext.max_side, info=info, stats=stats):
            if not killed:  # first result: both actors still hold queued batches; kill one mid-run
                victim = info[1]["pid"]
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
            yield item

    rows, errors = _collect(run())
    assert not errors
    _same(rows, ref)  # every row, once, as computed locally
    # Ray restarted the dead actor (a new process) and its batches were done again there
    assert any(p not in {i["pid"] for i in info} for p in stats["result_pids"]), stats


def test_strict_stops_at_the_first_failure(ray_cluster, demo_entries):
    ext = make_extractor("colour", {})
    todo = [Entry("missing.jpg", Path("/nonexistent/missing.jpg"), None)] + demo_entries[:4]
    seen = []
    with pytest.raises(CbirError, match="--strict: .*missing.jpg: file not found"):
        for kind, *it in ray_rows(todo, ext, address=ray_cluster["address"], batch_size=1, decode_side=ext.max_side, strict=True):
            seen.append(kind)
    assert "error" in seen


def test_worker_refuses_another_extractor():
    """An actor whose extractor does not reproduce the driver's key (other weights, config or state) refuses to work."""
    w = RayWorker("colour", {}, {}, "not-the-key", 1, None, 0)
    assert "key" in w.info()["failed"]
    assert w.run([(0, "/nonexistent.jpg")])["fatal"]
    w = RayWorker("no-such-extractor", {}, {}, "k", 1, None, 0)
    assert "cannot make extractor" in w.info()["failed"]


def test_bad_address_and_missing_ray(monkeypatch):
    with pytest.raises(CbirError, match="expected auto"):
        RaySession("not an address").__enter__()
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(CbirError, match=r"pip install 'cbir\[ray\]'"):
        list(ray_rows([Entry("a", Path("a.jpg"))], make_extractor("colour", {}), address="auto"))


_SESSION_PROBE = """
import json, os, sys
import ray
from cbir.distributed import RaySession

def descendants():
    kids, out = {}, []
    for d in os.listdir("/proc"):
        try:
            ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    todo = [os.getpid()]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out

with RaySession(sys.argv[1]) as s:
    nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
    print(json.dumps({"kind": s.kind, "to": s.connected_to, "nodes": nodes, "cpus": ray.cluster_resources().get("CPU"),
                      "pids": descendants()}))
"""


def _probe(address: str, env_extra=None):
    import json

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", **(env_extra or {})})
    r = subprocess.run([sys.executable, "-c", _SESSION_PROBE, address], capture_output=True, text=True, env=env, timeout=180,
                       cwd=str(REPO))
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_auto_finds_the_running_cluster(ray_cluster):
    """What `--ray auto` does in a new process: the running (loopback) cluster is found and joined as it is."""
    got = _probe("auto")
    assert got["kind"] == "cluster" and got["to"] == ray_cluster["address"], got
    assert got["nodes"] == ["127.0.0.1", "127.0.0.1"] and got["cpus"] == 2


def test_local_cluster_stays_on_loopback_and_stops():
    """`--ray local` (and `auto` without a cluster): a private cluster on 127.0.0.1, gone when the session ends."""
    import shutil

    tmp = tempfile.mkdtemp(prefix="cbir-ray-", dir="/tmp")  # its session logs (short: socket paths live under it)
    try:  # no token written to ~/.ray by the test
        got = _probe("local", {"RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": tmp})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert got["kind"] == "local" and got["nodes"] == ["127.0.0.1"], got
    assert got["cpus"] == min(4, os.cpu_count() or 1)
    assert got["pids"]  # the cluster's daemons, started by the session
    alive = _alive_after(lambda: [p for p in got["pids"] if Path(f"/proc/{p}").exists()], 30)  # daemons exit within seconds
    assert not alive, f"left running 30 s after the session ended: {alive}"


def test_build_with_ray_equals_the_local_build_and_resumes(ray_cluster, demo_entries, tmp_path, monkeypatch):
    """`build_index(..., ray=ADDRESS)`: the same index as a local build; interrupted, the same build resumes from the
    rows already written (the work folder a cluster build fills is a local build's)."""
    from cbir.engine import Index, build_index
    from cbir.errors import CbirError
    from cbir.index import store

    build_index(demo_entries, tmp_path / "local", extractor="colour", progress=False)
    calls = {"n": 0}
    append = store.RowSegments.append

    def stop_after_two(self, rows):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return append(self, rows)

    monkeypatch.setattr(store.RowSegments, "append", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        build_index(demo_entries, tmp_path / "ray", extractor="colour", progress=False, batch_size=4, ray=ray_cluster["address"])
    monkeypatch.undo()
    assert not (tmp_path / "ray").exists() and len(list((tmp_path / "ray.partial" / "rows").glob("part-*.h5"))) == 2
    rep = build_index(demo_entries, tmp_path / "ray", extractor="colour", progress=False, batch_size=4, ray=ray_cluster["address"])
    assert rep.reused == 8 and rep.extracted == len(demo_entries) - 8
    a, b = Index(tmp_path / "local"), Index(tmp_path / "ray")
    assert list(a.names) == list(b.names)
    np.testing.assert_allclose(b.descriptors, a.descriptors, atol=1e-6)
    with pytest.raises(CbirError, match="--ray extracts global descriptors only"):
        build_index(demo_entries, tmp_path / "ray2", extractor="colour", progress=False, local="sift", ray=ray_cluster["address"])
