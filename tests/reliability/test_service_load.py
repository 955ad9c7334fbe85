"""Issue 20.3 (memory) and 20.4: a real ``cbir serve`` on 127.0.0.1 under load: its memory over 1,000 mixed requests,
searches while its index folder is replaced by rebuilds, and a kill -9 in the middle of writes."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="cbir serve needs FastAPI: pip install 'cbir[serve]'")
pytest.importorskip("python_multipart", reason="cbir serve needs python-multipart: pip install 'cbir[serve]'")
httpx = pytest.importorskip("httpx")

from serve.support import (ServeProcess, bomb_png, build, get_request, multipart, query_bytes, raw_http, rss_bytes,  # noqa: E402
                           variant, write_gallery)

REPO = Path(__file__).resolve().parents[2]
RELOAD_S = 0.2


def _cli(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cbir", *args], env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------- memory


def _mixed(client, port, i, bomb, cut):
    """Request ``i`` of a fixed cycle of good and bad requests; returns its status."""
    k = i % 16
    if k == 0:
        return client.post("/search?top_k=5", files={"image": ("q.jpg", query_bytes(i % 4), "image/jpeg")}).status_code
    if k == 1:
        return client.get(f"/search/similar/img/g{i % 4}_flip.jpg?top_k=5").status_code
    if k == 2:
        return client.get(f"/thumbs/img/g{i % 4}_base.jpg").status_code
    if k == 3:
        return client.get(f"/images/img/g{i % 4}_bright.jpg").status_code
    if k == 4:
        return client.get("/info").status_code
    if k == 5:
        return client.get("/sample?n=8").status_code
    if k == 6:
        return client.post("/search", files={"image": ("notes.txt", b"not an image\n" * 40, "text/plain")}).status_code
    if k == 7:
        return client.post("/search", files={"image": ("cut.jpg", cut, "image/jpeg")}).status_code
    if k == 8:
        return client.post("/search", files={"image": ("bomb.png", bomb, "image/png")}).status_code
    if k == 9:
        return raw_http(port, b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 999999999999\r\nConnection: close\r\n\r\n")[0]
    if k == 10:
        return raw_http(port, get_request("/images/../../etc/passwd"))[0]
    if k == 11:
        return client.get("/search/similar/img/g0_base.jpg?top_k=abc").status_code
    if k == 12:
        body, hs = multipart([("image", f"q{j}.jpg", query_bytes(0)) for j in range(50)])
        return client.post("/search", content=body, headers=hs).status_code
    if k == 13:
        return client.get("/nothing-here").status_code
    if k == 14:
        return client.post(f"/search?top_k=3&label=group{i % 4}", files={"image": ("q.png", query_bytes(i % 4, fmt="PNG"), "image/png")}).status_code
    return client.get("/health").status_code


@pytest.mark.long
def test_memory_after_1000_mixed_requests(tmp_path):
    """1,000 mixed requests (searches, thumbnails, files, info, and bad ones: non-images, truncated, a decompression bomb, over-size, traversal, bad numbers, 50 files) to `cbir serve` -> its RSS after 1,000 within 10 % of after 100, every answer the status its kind expects"""
    import io

    from PIL import Image

    index = build(write_gallery(tmp_path / "photos"), tmp_path / "index")
    buf = io.BytesIO()
    Image.fromarray(variant(2, "base")).save(buf, format="JPEG")
    cut, bomb = buf.getvalue()[:2000], bomb_png(20000)
    expect = {0: 200, 1: 200, 2: 200, 3: 200, 4: 200, 5: 200, 6: 415, 7: 400, 8: 413, 9: 413, 10: 404, 11: 422, 12: 400, 13: 404, 14: 200, 15: 200}
    srv = ServeProcess(index, log_path=tmp_path / "serve.log").wait_ready()
    rss = {}
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for i in range(1000):
                status = _mixed(c, srv.port, i, bomb, cut)
                assert status == expect[i % 16], (i, i % 16, status)
                if i + 1 in (100, 1000):
                    time.sleep(0.5)  # let freed buffers go back before reading
                    rss[i + 1] = rss_bytes(srv.proc.pid)
    finally:
        srv.stop()
    grown = rss[1000] / rss[100] - 1
    print(f"RSS after 100: {rss[100] / 2**20:.1f} MiB, after 1000: {rss[1000] / 2**20:.1f} MiB ({grown:+.1%})")
    assert grown <= 0.10, rss


# ----------------------------------------------------------------------------------------------- swaps under load


def _write_lists(root):
    """Two galleries of distinct names: a/ (2 groups, 6 images) and b/ (4 groups, 12 images), each with its list."""
    from PIL import Image

    names = {}
    for tag, groups in (("a", 2), ("b", 4)):
        lines = []
        for g in range(groups):
            for v in ("base", "flip", "bright"):
                p = root / tag / f"g{g}_{v}.jpg"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(variant(g, v)).save(p, quality=90)
                lines.append(f"{tag}/g{g}_{v}.jpg\tgroup{g}")
        (root / f"list_{tag}.txt").write_text("\n".join(lines) + "\n")
        names[tag] = {ln.split("\t")[0] for ln in lines}
    return names


@pytest.mark.long
def test_searches_while_the_index_is_rebuilt_three_times(tmp_path):
    """8 clients x 50 searches while `cbir index build --out DIR` replaces the served folder three times (a/ of 6 images, then b/ of 12, a/, b/) -> 0 errors, every answer all of one index or all of the other, never a mix; the service reloaded each time"""
    names = _write_lists(tmp_path)
    out = tmp_path / "T"
    assert _cli("index", "build", "--list", str(tmp_path / "list_a.txt"), "--out", str(out), "--extractor", "colour").returncode == 0
    srv = ServeProcess(out, "--reload-s", str(RELOAD_S), log_path=tmp_path / "serve.log").wait_ready()
    answers, errors, builds = [], [], []
    built = [threading.Event() for _ in range(3)]  # a client's searches 13, 26 and 39 wait for the 1st, 2nd, 3rd rebuild

    def client(k):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for j in range(50):
                if j and j % 13 == 0:
                    built[j // 13 - 1].wait(timeout=300)
                try:
                    r = c.post("/search?top_k=12", files={"image": ("q.jpg", query_bytes((k + j) % 2), "image/jpeg")})
                    if r.status_code != 200:
                        errors.append((k, j, r.status_code, r.text[:200]))
                        continue
                    got = {x["name"] for x in r.json()["results"]}  # top 12: the whole gallery of either version
                    answers.append((time.monotonic(), got))
                except httpx.HTTPError as e:
                    errors.append((k, j, type(e).__name__, str(e)))
                time.sleep(0.1)

    def rebuild():
        for i, tag in enumerate(("b", "a", "b")):
            time.sleep(0.5)
            t0 = time.monotonic()
            p = _cli("index", "build", "--list", str(tmp_path / f"list_{tag}.txt"), "--out", str(out), "--extractor", "colour")
            builds.append((time.monotonic(), tag, p.returncode, p.stderr[-300:], t0))
            time.sleep(5 * RELOAD_S)  # the watcher has seen the new folder before the clients go on
            built[i].set()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    rb = threading.Thread(target=rebuild)
    try:
        for t in threads:
            t.start()
        rb.start()
        for t in threads:
            t.join(timeout=600)
        rb.join(timeout=600)
        info = httpx.get(srv.url + "/info", timeout=30).json()["indexes"]["t"]
    finally:
        srv.stop()
    assert [b[1:3] for b in builds] == [("b", 0), ("a", 0), ("b", 0)], [b[:4] for b in builds]
    assert not errors, errors[:5]
    assert len(answers) == 8 * 50
    mixed = [got for _, got in answers if got not in (names["a"], names["b"])]
    assert not mixed, mixed[:3]
    during = [g for t, g in answers if builds[0][4] < t < builds[-1][0]]
    assert {frozenset(g) for g in during} == {frozenset(names["a"]), frozenset(names["b"])}, "no load while the folder was replaced"
    assert all(g == names["b"] for t, g in answers if t > builds[-1][0] + 5 * RELOAD_S)  # after the last rebuild and a reload: b
    assert info["reloads"] == 3 and info["count"] == 12, info


# ----------------------------------------------------------------------------------------------- kill -9 during writes


@pytest.mark.long
def test_server_killed_and_restarted_mid_load_loses_nothing(tmp_path):
    """`cbir serve --allow-write` killed (kill -9) while 4 clients add images and search, then restarted -> `cbir index verify` ok, every acknowledged add in the index with its file, the index answers and takes the next add"""
    from helpers import write_textured

    from cbir.query import Index

    index = build(write_gallery(tmp_path / "photos"), tmp_path / "index")
    base = len(Index(index))
    up = tmp_path / "uploads"
    acked, errors, stop = [], [], threading.Event()
    srv = ServeProcess(index, "--allow-write", "--upload-dir", str(up), log_path=tmp_path / "serve.log").wait_ready()
    for k in range(200):
        write_textured(tmp_path / "new" / f"n{k}.png", 1000 + k)

    def client(w):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for k in range(w, 200, 4):
                if stop.is_set():
                    return
                try:
                    data = (tmp_path / "new" / f"n{k}.png").read_bytes()
                    r = c.post("/images", files={"image": (f"n{k}.png", data, "image/png")}, data={"name": f"new/n{k}.png"})
                    if r.status_code == 201:
                        acked.append(r.json()["added"])
                    elif r.status_code not in (409, 503):  # a busy writer is a fair answer; anything else is a failure
                        errors.append((k, r.status_code, r.text[:200]))
                    c.post("/search?top_k=3", files={"image": ("q.jpg", query_bytes(k % 4), "image/jpeg")})
                except httpx.HTTPError:
                    return  # the server went away

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    while len(acked) < 12 and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    srv.kill()  # SIGKILL, mid-load: adds in flight
    stop.set()
    for t in threads:
        t.join(timeout=120)
    assert len(acked) >= 12 and not errors, (len(acked), errors[:3])

    v = _cli("index", "verify", str(index))
    assert v.returncode == 0, v.stdout[-500:] + v.stderr[-500:]
    idx = Index(index)
    have = set(map(str, idx.names))
    assert set(acked) <= have, sorted(set(acked) - have)[:5]
    assert base + len(acked) <= len(idx) <= base + len(acked) + 4  # at most the 4 in flight besides
    assert all(Path(str(idx.paths[idx.row(n)])).is_file() for n in acked)

    again = ServeProcess(index, "--allow-write", "--upload-dir", str(up), log_path=tmp_path / "serve2.log").wait_ready()
    try:
        assert httpx.get(again.url + "/health", timeout=30).json()["indexes"]["t"] == len(idx)
        r = httpx.post(again.url + "/search?top_k=2", files={"image": ("q.jpg", query_bytes(2), "image/jpeg")}, timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"] == "group2"
        data = (tmp_path / "new" / "n199.png").read_bytes()
        name = "new/after-restart.png"
        r = httpx.post(again.url + "/images", files={"image": ("x.png", data, "image/png")}, data={"name": name}, timeout=120)
        assert r.status_code == 201 and r.json()["count"] == len(idx) + 1, r.text[:300]
    finally:
        again.stop()
    assert _cli("index", "verify", str(index)).returncode == 0
