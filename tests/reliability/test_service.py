"""Issue 24.2, .4, .7: the service and an index folder changed in place, slow uploads, a lock held by another writer."""

import shutil
import socket
import time

import pytest

pytest.importorskip("fastapi", reason="cbir serve needs FastAPI: pip install 'cbir[serve]'")
pytest.importorskip("python_multipart", reason="cbir serve needs python-multipart: pip install 'cbir[serve]'")

from serve.support import LiveServer, build, make_config, query_bytes, write_gallery  # noqa: E402

from cbir.index import store  # noqa: E402


@pytest.fixture
def galleries(tmp_path):
    """(the served index of 6 images, a rebuild of 12 next to it)"""
    entries = write_gallery(tmp_path / "photos")
    return build(entries[:6], tmp_path / "served"), build(entries, tmp_path / "new")


def _client(folder, **kw):
    from fastapi.testclient import TestClient

    from cbir.serve.app import create_app

    app = create_app(make_config(folder, **kw))
    c = TestClient(app)
    c.service = app.service
    return c


def test_files_copied_over_a_served_folder_are_refused_until_reloaded(galleries):
    """an index's files copied over the served folder in place (`cp new/* DIR/`) -> 503 with Retry-After naming the change until the watcher opens the copy, then its answers"""
    served, new = galleries
    with _client(served) as c:
        assert c.get("/search/similar/img/g0_base.jpg?top_k=3").status_code == 200
        for p in sorted(new.iterdir()):  # `cp new/* DIR/`: the same files (inodes) rewritten under the open index
            shutil.copyfile(p, served / p.name)
        r = c.get("/search/similar/img/g0_base.jpg?top_k=3")
        assert r.status_code == 503 and "changed in place" in r.json()["error"] and r.headers["retry-after"], r.text
        assert c.post("/search", files={"image": ("q.jpg", query_bytes(0), "image/jpeg")}).status_code == 503
        info = c.get("/info").json()["indexes"]["t"]
        assert info["changed_in_place"] is True and c.get("/health").status_code == 200
        assert c.service.slots["t"].check() is True  # the watcher's check (every --reload-s) opens the copied version
        r = c.get("/search/similar/img/g0_base.jpg?top_k=3")
        assert r.status_code == 200 and c.get("/info").json()["indexes"]["t"]["count"] == 12
        assert c.get("/info").json()["indexes"]["t"]["changed_in_place"] is False


def test_a_copy_that_does_not_open_keeps_refusing_and_says_why(galleries):
    """half a copy over the served folder (features.h5 of another index) -> 503 naming features.h5, /info's reload_error says why; the completed copy is served"""
    served, new = galleries
    with _client(served) as c:
        shutil.copyfile(new / store.FEATURES, served / store.FEATURES)  # half a copy: features of another index
        assert c.service.slots["t"].check() is False
        r = c.get("/search/similar/img/g0_base.jpg")
        assert r.status_code == 503 and "features.h5" in r.json()["error"]
        assert "features.h5" in c.get("/info").json()["indexes"]["t"]["reload_error"]
        for p in sorted(new.iterdir()):  # the copy completes: the next check takes it
            shutil.copyfile(p, served / p.name)
        assert c.service.slots["t"].check() is True and c.get("/search/similar/img/g0_base.jpg").status_code == 200


def test_a_lock_conflict_on_the_write_routes_is_409(galleries, tmp_path):
    """POST /images and DELETE /images/NAME while another process's update holds the index lock -> 409 with Retry-After; the write goes through once it is released"""
    served, _ = galleries
    work = store.partial_dir(served)
    store.claim_work(work, served)
    with _client(served, allow_write=True, upload_dir=str(tmp_path / "up")) as c:
        with store.BuildLock(work, served):  # another process's update (the CLI) is writing this index
            r = c.post("/images", files={"image": ("new.jpg", query_bytes(3, "flip"), "image/jpeg")}, data={"name": "img/new.jpg"})
            assert r.status_code == 409 and "another build" in r.json()["error"] and r.headers["retry-after"], r.text
            r = c.delete("/images/img/g0_base.jpg")
            assert r.status_code == 409 and "another build" in r.json()["error"], r.text
        r = c.post("/images", files={"image": ("new.jpg", query_bytes(3, "flip"), "image/jpeg")}, data={"name": "img/new.jpg"})
        assert r.status_code == 201, r.text


def _slow_upload(port: int):
    """A connection that sends the headers of a 10 kB upload and 3 bytes of it, then nothing."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
              b"Content-Length: 10000\r\n\r\n--x")
    return s


def _wait_receiving(service, n):
    for _ in range(400):  # bounded: 20 s at most
        if service.receiving.get("127.0.0.1", 0) == n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the server did not see {n} uploads in progress: {service.receiving}")


@pytest.fixture
def live(galleries):
    from cbir.serve.app import create_app

    made = []

    def start(**kw):
        app = create_app(make_config(galleries[0], **kw))
        srv = LiveServer(app, limit_s=120).start()
        srv.service = app.service
        made.append(srv)
        return srv

    yield start
    for srv in made:
        srv.join()
        assert not srv.thread.is_alive()


def _search(url):
    import httpx

    return httpx.post(f"{url}/search?top_k=2", files={"image": ("q.jpg", query_bytes(1), "image/jpeg")}, timeout=60)


def test_slow_uploads_hold_no_queue_place(live):
    """twice --queue uploads stalled after 3 bytes of their bodies -> they hold no place in the queue: searches and similar are answered 200"""
    srv = live(queue=2)
    port = int(srv.url.rsplit(":", 1)[1])
    socks = [_slow_upload(port) for _ in range(4)]  # twice --queue
    try:
        _wait_receiving(srv.service, 4)
        assert srv.service.inflight == 0
        r = _search(srv.url)
        assert r.status_code == 200 and r.json()["results"], r.text
        import httpx

        assert httpx.get(f"{srv.url}/search/similar/img/g0_base.jpg?top_k=2", timeout=60).status_code == 200
    finally:
        for s in socks:
            s.close()
    _wait_receiving(srv.service, 0)


def test_one_client_may_send_only_so_many_uploads_at_once(live):
    """one client opening more stalled uploads than --max-uploads-per-client -> 503 'still being received' for the extra one; room again when one goes"""
    srv = live(max_receiving_per_client=2)
    port = int(srv.url.rsplit(":", 1)[1])
    socks = [_slow_upload(port) for _ in range(2)]
    try:
        _wait_receiving(srv.service, 2)
        third = _slow_upload(port)
        socks.append(third)
        answer = b""
        for _ in range(100):  # bounded: the answer is short and the server closes the connection after it
            chunk = third.recv(4096)
            if not chunk:
                break
            answer += chunk
        answer = answer.decode("latin-1")
        assert answer.startswith("HTTP/1.1 503") and "still being received" in answer, answer[:300]
        socks.pop(0).close()  # one finishes (goes away): room for another
        _wait_receiving(srv.service, 1)
        assert _search(srv.url).status_code == 200
    finally:
        for s in socks:
            s.close()
