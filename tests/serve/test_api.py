"""The HTTP API through FastAPI's TestClient: answers, every bad upload as a 4xx JSON error, names that must not
become paths, limits, the token, writes, and an index folder swapped under a running service."""

import base64
import io
import json
import os
import shutil
import threading
import time

import numpy as np
import pytest
from serve.support import GROUPS, build, make_config, query_bytes, variant, write_gallery


def _jpeg(arr) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _err(r, status):
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    return body["error"]


# ----------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("g", range(GROUPS))
def test_search_ranks_the_query_group_first(client, g):
    r = client.post("/search?top_k=3", files={"image": ("q.jpg", query_bytes(g), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    res = body["results"]
    assert [x["rank"] for x in res] == [1, 2, 3]
    assert all(x["label"] == f"group{g}" for x in res), res
    assert all(set(x) >= {"rank", "name", "label", "score", "image", "thumb"} and "path" not in x for x in res)
    assert res[0]["score"] >= res[1]["score"] >= res[2]["score"]
    assert set(body["seconds"]) >= {"decode", "queue", "extract", "search", "total"}
    assert body["query"] == {"name": "q.jpg", "described_size": [256, 188]}  # 272x200 shrunk to the extractor's 256


def test_search_answers_png_and_matches_the_cli(client, gallery):
    """A PNG upload works, and the service ranks exactly as the library does for the same file."""
    from cbir.engine import load_index

    data = query_bytes(1, "crop", "PNG")
    r = client.post("/search?top_k=5", files={"image": ("q.png", data, "image/png")})
    assert r.status_code == 200, r.text
    path = gallery[0] / "q1.png"
    path.write_bytes(data)
    want = load_index(gallery[1]).query_images([path], top_k=5)[0]["results"]
    assert [x["name"] for x in r.json()["results"]] == [x["name"] for x in want]
    assert [x["score"] for x in r.json()["results"]] == pytest.approx([x["score"] for x in want], abs=1e-5)


def test_search_applies_the_index_graph_stage_like_the_cli(client, gallery):
    """No expand parameter: the graph stage the index records, as `cbir query`; expand=false: plain top-k, as --no-graph."""
    from cbir.engine import load_index

    idx = load_index(gallery[1])
    assert idx.manifest["graph"]  # built with the default stage
    path = gallery[0] / "q2.jpg"
    data = query_bytes(2, "crop")
    path.write_bytes(data)
    for param, expand in (("", "index"), ("&expand=false", None)):
        r = client.post(f"/search?top_k=6{param}", files={"image": ("q.jpg", data, "image/jpeg")})
        assert r.status_code == 200, r.text
        want = idx.query_images([path], top_k=6, expand=expand)[0]["results"]
        assert [x["name"] for x in r.json()["results"]] == [x["name"] for x in want], param
        assert [x["score"] for x in r.json()["results"]] == pytest.approx([x["score"] for x in want], abs=1e-5)


def test_label_filter(client):
    r = client.post("/search?top_k=2&label=group2", files={"image": ("q.jpg", query_bytes(0), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert [x["label"] for x in r.json()["results"]] == ["group2", "group2"]
    msg = _err(client.post("/search?label=nope", files={"image": ("q.jpg", query_bytes(0), "image/jpeg")}), 400)
    assert "nope" in msg and "group0" in msg


def test_expand_and_rerank_options(client):
    r = client.post("/search?top_k=3&expand=true", files={"image": ("q.jpg", query_bytes(3), "image/jpeg")})
    assert r.status_code == 200 and r.json()["results"][0]["label"] == "group3", r.text
    msg = _err(client.post("/search?rerank=true", files={"image": ("q.jpg", query_bytes(3), "image/jpeg")}), 400)
    assert "local features" in msg and "--local" in msg


@pytest.mark.parametrize("url, where", [("/search?top_k=0", "top_k"), ("/search?top_k=1000", "top_k"), ("/search?qe_k=x", "qe_k")])
def test_bad_query_parameters(client, url, where):
    msg = _err(client.post(url, files={"image": ("q.jpg", query_bytes(0), "image/jpeg")}), 422)
    assert where in msg


def test_similar_excludes_itself(client):
    r = client.get("/search/similar/img/g2_base.jpg?top_k=2")
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [x["label"] for x in res] == ["group2", "group2"]
    assert "img/g2_base.jpg" not in [x["name"] for x in res]
    assert r.json()["query"]["label"] == "group2"


# ----------------------------------------------------------------------------------------------- bad uploads


def test_empty_upload(client):
    msg = _err(client.post("/search", files={"image": ("empty.jpg", b"", "image/jpeg")}), 400)
    assert "empty" in msg and "empty.jpg" in msg


def test_truncated_upload(client):
    data = _jpeg(variant(0, "base"))
    msg = _err(client.post("/search", files={"image": ("cut.jpg", data[: len(data) // 3], "image/jpeg")}), 400)
    assert "truncated" in msg or "corrupt" in msg


def test_non_image_upload(client):
    msg = _err(client.post("/search", files={"image": ("notes.txt", b"just some text, not pixels\n" * 20, "text/plain")}), 415)
    assert "not an image" in msg


def test_huge_upload_is_413_before_decoding(client):
    blob = os.urandom(client.service.cfg.max_upload_bytes + 200_000)
    msg = _err(client.post("/search", files={"image": ("big.jpg", blob, "image/jpeg")}), 413)
    assert "too large" in msg


def test_decoded_pixel_budget(client):
    """A small file that decodes to too many pixels (a decompression bomb) is refused by cbir's pixel limit."""
    from PIL import Image

    from cbir import data

    buf = io.BytesIO()
    Image.new("L", (3000, 3000), 128).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    before = data.set_limits(max_pixels=4_000_000)
    try:
        msg = _err(client.post("/search", files={"image": ("bomb.png", buf.getvalue(), "image/png")}), 413)
    finally:
        data.set_limits(**before)
    assert "pixels" in msg and "bomb.png" in msg


def test_wrong_field_name(client):
    msg = _err(client.post("/search", files={"file": ("q.jpg", query_bytes(0), "image/jpeg")}), 422)
    assert "'image'" in msg


def test_text_instead_of_a_file(client):
    msg = _err(client.post("/search", data={"image": "hello"}), 422)
    assert "image" in msg


def test_raw_body_instead_of_a_form(client):
    msg = _err(client.post("/search", content=query_bytes(0), headers={"content-type": "image/jpeg"}), 415)
    assert "multipart/form-data" in msg


def test_blank_image_is_a_clear_error_or_an_answer(client):
    """A uniform image still has a colour histogram: answered; the answer is well formed."""
    r = client.post("/search?top_k=1", files={"image": ("white.jpg", _jpeg(np.full((64, 64, 3), 255, np.uint8)), "image/jpeg")})
    assert r.status_code in (200, 422), r.text
    if r.status_code == 422:
        assert "descriptor" in r.json()["error"]


# ----------------------------------------------------------------------------------------------- gallery files by name


def test_gallery_image_and_thumb(client, gallery):
    from PIL import Image

    r = client.get("/images/img/g1_flip.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == (gallery[0] / "photos" / "img" / "g1_flip.jpg").read_bytes()
    t = client.get("/thumbs/img/g1_flip.jpg")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(t.content)).size) <= 256
    assert client.get("/thumbs/img/g1_flip.jpg").content == t.content  # cached


@pytest.mark.parametrize("path", ["/images/nope.jpg", "/thumbs/nope.jpg", "/search/similar/nope.jpg"])
def test_unknown_name(client, path):
    msg = _err(client.get(path), 404)
    assert "nope.jpg" in msg


TRAVERSALS = ["../secret.txt", "..%2fsecret.txt", "%2e%2e/%2e%2e/secret.txt", "img/../secret.txt", "img/..%2f..%2fsecret.txt",
              "%2Fetc%2Fpasswd", "/etc/passwd", "....//....//secret.txt", "img/g0_base.jpg%00.txt", "img%5c..%5c..%5csecret.txt",
              "%252e%252e%252fsecret.txt"]


@pytest.mark.parametrize("route", ["/images/", "/thumbs/", "/search/similar/"])
@pytest.mark.parametrize("name", TRAVERSALS)
def test_path_traversal_never_reads_a_file(client, gallery, route, name):
    r = client.get(route + name)
    assert r.status_code in (404, 400), (r.status_code, r.text[:200])
    assert b"TOP-SECRET" not in r.content and b"root:" not in r.content
    assert r.headers["content-type"].startswith("application/json")


def test_absolute_path_of_a_gallery_file_is_not_a_name(client, gallery):
    p = str(gallery[0] / "photos" / "img" / "g0_base.jpg")
    _err(client.get("/images/" + p.lstrip("/")), 404)
    _err(client.get("/images//" + p.lstrip("/")), 404)


def test_static_files_are_a_fixed_list(client):
    assert client.get("/static/app.js").status_code == 200
    for bad in ["/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/index.html.bak", "/static/..%2f..%2fsecret.txt"]:
        r = client.get(bad)
        assert r.status_code == 404, bad
        assert b"import" not in r.content


# ----------------------------------------------------------------------------------------------- page, docs, info


def test_page_and_docs(client):
    r = client.get("/")
    assert r.status_code == 200 and 'type="file"' in r.text and "/static/app.js" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    d = client.get("/docs")
    assert d.status_code == 200 and "swagger" in d.text.lower()
    if "/docs-assets/" in d.text:  # fastapi-offline installed: Swagger UI served here, nothing from a CDN
        assert "cdn." not in d.text
        assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    for p in ("/search", "/search/similar/{name}", "/images/{name}", "/thumbs/{name}", "/match", "/health", "/info", "/images"):
        assert p in spec["paths"], p


def test_health_and_info(client, gallery):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["indexes"] == {"t": GROUPS * 3}
    r = client.get("/info")
    info = r.json()["indexes"]["t"]
    assert info["count"] == GROUPS * 3 and info["extractor"] == "colour" and info["labels"] == [f"group{g}" for g in range(GROUPS)]
    assert info["metric"] == "cosine" and info["local_features"] is None
    assert str(gallery[0]) not in r.text  # no server path in the answer
    _err(client.get("/info?index=other"), 404)


def test_unknown_endpoint_and_method(client):
    assert "no such endpoint" in _err(client.get("/nothing-here"), 404)
    assert "not allowed" in _err(client.get("/search"), 405)


# ----------------------------------------------------------------------------------------------- match


def test_match_upload_against_gallery_name(client):
    r = client.post("/match?name1=img/g2_base.jpg", files={"image0": ("q.jpg", query_bytes(2, "crop", "PNG"), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["features"] == "sift" and body["matcher"] == "mnn" and body["model"] == "homography"
    assert body["n_inliers"] >= 15 and body["model_matrix"] is not None, body
    assert body["overlay"].startswith("data:image/png;base64,")
    png = base64.b64decode(body["overlay"].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    other = client.post("/match?name0=img/g2_base.jpg&name1=img/g0_base.jpg").json()
    assert other["n_inliers"] < body["n_inliers"]


def test_match_png_and_bad_sides(client):
    r = client.post("/match?name0=img/g1_base.jpg&name1=img/g1_bright.jpg&format=png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and int(r.headers["x-inliers"]) > 0
    assert "image0" in _err(client.post("/match?name1=img/g1_base.jpg"), 422)
    assert "both" in _err(client.post("/match?name0=img/g1_base.jpg&name1=img/g1_base.jpg",
                                      files={"image0": ("q.jpg", query_bytes(1), "image/jpeg")}), 400)
    _err(client.post("/match?name0=../secret.txt&name1=img/g1_base.jpg"), 404)
    _err(client.post("/match?name0=img/g1_base.jpg&name1=img/g1_base.jpg&model=magic"), 422)


# ----------------------------------------------------------------------------------------------- limits, token, guards


def test_busy_is_503_with_retry_after(client):
    svc = client.service
    saved = svc.inflight
    svc.inflight = svc.cfg.queue
    try:
        r = client.post("/search", files={"image": ("q.jpg", query_bytes(0), "image/jpeg")})
    finally:
        svc.inflight = saved
    assert "busy" in _err(r, 503)
    assert int(r.headers["retry-after"]) >= 1
    assert client.get("/health").status_code == 200  # health is never refused


def test_timeout_is_504(gallery, monkeypatch):
    from fastapi.testclient import TestClient

    from cbir.serve.app import create_app

    app = create_app(make_config(gallery[1], timeout_s=0.5))
    loaded = app.service.loaded(None)
    # the work blocks until the answer is in: a 504 that comes first is the deadline's, however slow the machine
    release = threading.Event()
    monkeypatch.setattr(loaded, "describe", lambda imgs: (release.wait(60), np.zeros((len(imgs), 1)))[1])
    with TestClient(app) as c:
        try:
            msg = _err(c.post("/search", files={"image": ("q.jpg", query_bytes(0), "image/jpeg")}), 504)
            assert not release.is_set()
        finally:
            release.set()
    assert "time limit" in msg


def test_token(gallery):
    from fastapi.testclient import TestClient

    from cbir.serve.app import create_app

    tok = "s3cret-token-0123456789"
    with TestClient(create_app(make_config(gallery[1], token=tok))) as c:
        files = {"image": ("q.jpg", query_bytes(0), "image/jpeg")}
        r = c.post("/search", files=files)
        assert "token" in _err(r, 401) and r.headers["www-authenticate"] == "Bearer"
        _err(c.post("/search", files=files, headers={"Authorization": "Bearer wrong-token-0123456789"}), 401)
        _err(c.get("/images/img/g0_base.jpg"), 401)
        _err(c.get("/info"), 401)
        assert c.post("/search", files=files, headers={"Authorization": f"Bearer {tok}"}).status_code == 200
        assert c.get("/thumbs/img/g0_base.jpg", headers={"cookie": f"cbir_token={tok}"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # no data behind these
    with pytest.raises(Exception, match="16 characters"):
        create_app(make_config(gallery[1], token="short"))


def test_host_and_origin_guards(gallery):
    from fastapi.testclient import TestClient

    from cbir.serve.app import create_app

    with TestClient(create_app(make_config(gallery[1], allowed_hosts=["127.0.0.1", "localhost"])), base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
        assert "rebinding" in _err(c.get("/health", headers={"host": "evil.example:8000"}), 421)
        files = {"image": ("q.jpg", query_bytes(0), "image/jpeg")}
        _err(c.post("/search", files=files, headers={"origin": "http://evil.example"}), 403)
        assert c.post("/search", files=files, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200


# ----------------------------------------------------------------------------------------------- writes


def test_writes_need_allow_write(client):
    assert "--allow-write" in _err(client.post("/images", files={"image": ("a.jpg", query_bytes(0), "image/jpeg")}), 403)
    assert "--allow-write" in _err(client.delete("/images/img/g0_base.jpg"), 403)


def test_add_and_remove_images(tmp_path):
    from fastapi.testclient import TestClient

    from cbir.serve.app import create_app

    folder = build(write_gallery(tmp_path / "photos", groups=range(2)), tmp_path / "index")
    with TestClient(create_app(make_config(folder, allow_write=True))) as c:
        q = query_bytes(3, "base")
        before = c.post("/search?top_k=1", files={"image": ("q.jpg", q, "image/jpeg")}).json()["results"][0]
        assert before["label"] != "group3"
        r = c.post("/images", files={"image": ("new one.jpg", q, "image/jpeg")}, data={"label": "group3"})
        assert r.status_code == 201, r.text
        assert r.json()["added"] == "uploads/new_one.jpg" and r.json()["count"] == 7
        after = c.post("/search?top_k=1", files={"image": ("q.jpg", q, "image/jpeg")}).json()["results"][0]
        assert after["name"] == "uploads/new_one.jpg" and after["label"] == "group3" and after["score"] > 0.99
        assert c.get("/images/uploads/new_one.jpg").content == q
        stored = list((tmp_path / "index.uploads").iterdir())
        assert len(stored) == 1 and stored[0].suffix == ".jpg"  # a name the service chose, not the upload's
        assert "already" in _err(c.post("/images", files={"image": ("x.jpg", q, "image/jpeg")}, data={"name": "uploads/new_one.jpg"}), 409)
        for bad in ["../escape.jpg", "a/../../b.jpg", "/abs.jpg", "with\nnewline.jpg"]:
            _err(c.post("/images", files={"image": ("x.jpg", q, "image/jpeg")}, data={"name": bad}), 400)
        _err(c.post("/images", files={"image": ("x.txt", b"not an image", "text/plain")}), 415)
        assert c.delete("/images/uploads/new_one.jpg").json()["count"] == 6
        assert not stored[0].exists()
        _err(c.get("/images/uploads/new_one.jpg"), 404)
        _err(c.delete("/images/uploads/new_one.jpg"), 404)
        assert c.get("/health").json()["indexes"] == {"t": 6}


# ----------------------------------------------------------------------------------------------- the index swapped under the service


def test_index_swapped_without_restart(tmp_path):
    from fastapi.testclient import TestClient

    from cbir.serve.app import create_app

    photos = tmp_path / "photos"
    folder = build(write_gallery(photos, groups=range(2)), tmp_path / "index")
    with TestClient(create_app(make_config(folder, reload_s=0.1))) as c:
        assert c.get("/health").json()["indexes"] == {"t": 6}
        stop = threading.Event()
        errors = []

        def hammer():  # requests all through the swap: each is answered by the old or the new version, none fails
            while not stop.is_set():
                r = c.post("/search?top_k=1", files={"image": ("q.jpg", query_bytes(0), "image/jpeg")})
                if r.status_code != 200:
                    errors.append(r.text)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            build(write_gallery(photos, groups=range(4)), folder)  # a rebuild replaces the folder as a whole
            for _ in range(100):
                if c.get("/health").json()["indexes"] == {"t": 12}:
                    break
                time.sleep(0.1)
        finally:
            stop.set()
            t.join(timeout=30)
        assert c.get("/health").json()["indexes"] == {"t": 12}
        assert not errors, errors[:2]
        r = c.post("/search?top_k=1", files={"image": ("q.jpg", query_bytes(3), "image/jpeg")})
        assert r.json()["results"][0]["label"] == "group3"
        # a replacement that does not open: the service keeps answering from the version it has, and says why
        work = tmp_path / "broken"
        shutil.copytree(folder, work)
        (work / "manifest.json").write_text("{not json")
        shutil.rmtree(folder)
        os.replace(work, folder)
        for _ in range(100):
            err = c.get("/info").json()["indexes"]["t"]["reload_error"]
            if err:
                break
            time.sleep(0.1)
        assert err and "manifest" in err
        assert c.post("/search?top_k=1", files={"image": ("q.jpg", query_bytes(3), "image/jpeg")}).json()["results"][0]["label"] == "group3"


# ----------------------------------------------------------------------------------------------- the batcher


class _SlowLoaded:
    """Stands in for an opened index: describes a batch in 0.15 s, each image as its mean value."""

    def __init__(self):
        self.batches = []

    def describe(self, images):
        self.batches.append(len(images))
        time.sleep(0.15)
        return np.array([[float(im.mean())] for im in images], np.float32)


@pytest.mark.parametrize("max_batch", [1, 8])
def test_batcher_groups_concurrent_queries(max_batch):
    from cbir.serve.state import Batcher

    b = Batcher(max_batch=max_batch, capacity=16, workers=1)
    fake = _SlowLoaded()
    b.start()
    out = {}
    try:
        def one(i):
            out[i] = b.describe(fake, np.full((4, 4, 3), i, np.uint8), timeout=20)

        ts = [threading.Thread(target=one, args=(i,)) for i in range(6)]
        [t.start() for t in ts]
        [t.join() for t in ts]
    finally:
        b.stop()
    assert sorted(out) == list(range(6))
    assert all(float(vec[0, 0]) == i for i, (vec, _) in out.items())  # each request gets its own row back
    assert sum(fake.batches) == 6
    if max_batch == 1:
        assert fake.batches == [1] * 6
    else:
        assert max(fake.batches) > 1 and len(fake.batches) < 6
        assert max(job.batch for _, job in out.values()) > 1


def test_batcher_bounded_queue_and_timeout():
    from cbir.serve.state import Batcher, Busy, TimedOut

    b = Batcher(max_batch=1, capacity=2, workers=1)
    fake = _SlowLoaded()
    img = np.zeros((4, 4, 3), np.uint8)
    b.submit(fake, img)
    b.submit(fake, img)
    with pytest.raises(Busy) as e:
        b.submit(fake, img)
    assert e.value.retry_after >= 1 and "full" in str(e.value)
    b2 = Batcher(max_batch=1, capacity=4, workers=1)
    b2.start()
    try:
        b2.submit(fake, img)  # occupies the worker for 0.15 s
        with pytest.raises(TimedOut):
            b2.describe(fake, img, timeout=0.01)
    finally:
        b2.stop()


def test_bad_image_in_a_batch_fails_alone():
    from cbir.serve.state import Batcher

    class Picky(_SlowLoaded):
        def describe(self, images):
            if any(im.mean() == 7 for im in images):
                raise ValueError("cannot describe 7")
            return super().describe(images)

    b = Batcher(max_batch=8, capacity=8, workers=1, wait_s=0.3)
    fake = Picky()
    b.start()
    try:
        jobs = [b.submit(fake, np.full((4, 4, 3), v, np.uint8)) for v in (1, 7, 3)]
        assert float(jobs[0].future.result(10)[0, 0]) == 1 and float(jobs[2].future.result(10)[0, 0]) == 3
        with pytest.raises(ValueError, match="cannot describe 7"):
            jobs[1].future.result(10)
    finally:
        b.stop()


# ----------------------------------------------------------------------------------------------- the command line


def test_cli_refuses_exposed_host_without_token(gallery, monkeypatch):
    from cbir.cli import build_parser
    from cbir.errors import CbirError
    from cbir.cli.serve import config_from_args

    monkeypatch.delenv("CBIR_TOKEN", raising=False)
    p = build_parser()
    with pytest.raises(CbirError, match="--token"):
        config_from_args(p.parse_args(["serve", "--index", str(gallery[1]), "--host", "0.0.0.0"]))
    monkeypatch.setenv("CBIR_TOKEN", "x" * 20)
    cfg = config_from_args(p.parse_args(["serve", "--index", f"g={gallery[1]}", "--host", "0.0.0.0"]))
    assert cfg.token == "x" * 20 and cfg.allowed_hosts is None and list(cfg.indexes) == ["g"]
    cfg = config_from_args(p.parse_args(["serve", "--index", str(gallery[1])]))
    assert cfg.allowed_hosts and "127.0.0.1" in cfg.allowed_hosts and list(cfg.indexes) == ["index"]
    with pytest.raises(CbirError, match="not a cbir index"):
        config_from_args(p.parse_args(["serve", "--index", str(gallery[0])]))
    with pytest.raises(CbirError, match="two indexes"):
        config_from_args(p.parse_args(["serve", "--index", str(gallery[1]), "--index", f"index={gallery[1]}"]))
    with pytest.raises(CbirError, match="FEATURES\\+MATCHER"):
        config_from_args(p.parse_args(["serve", "--index", str(gallery[1]), "--match", "sift"]))


# ----------------------------------------------------------------------------------------------- a real socket


def _post(url, body: bytes, headers):
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _multipart(field, filename, data):
    b = "testboundary7d93"
    body = (f"--{b}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={b}"}


def test_live_server_search_and_413_on_a_socket(live_server):
    body, hs = _multipart("image", "q.jpg", query_bytes(1))
    status, out = _post(live_server.url + "/search?top_k=2", body, hs)
    assert status == 200 and json.loads(out)["results"][0]["label"] == "group1"
    big, hs = _multipart("image", "big.bin", os.urandom(3 * 1024 * 1024))
    status, out = _post(live_server.url + "/search", big, hs)
    assert status == 413 and "too large" in json.loads(out)["error"]


def test_live_server_413_on_a_chunked_upload(live_server):
    """No Content-Length to refuse up front: the body is counted as it arrives and refused past the limit."""
    import http.client

    host, port = live_server.url.rsplit("/", 1)[-1].split(":")
    _, hs = _multipart("image", "big.bin", b"")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)

    def chunks():
        yield b"--testboundary7d93\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.bin\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * (64 * 1024)
        yield b"\r\n--testboundary7d93--\r\n"

    try:  # the refused rest is read and dropped by the server, so the client gets its answer, not a reset connection
        conn.request("POST", "/search", body=chunks(), headers=hs, encode_chunked=True)
        r = conn.getresponse()
        status, out = r.status, r.read()
    finally:
        conn.close()
    assert status == 413 and "too large" in json.loads(out)["error"]


# ----------------------------------------------------------------------------------------------- re-ranking


def test_rerank_marks_verified_results(tmp_path):
    """An index built with local features (SIFT here) re-ranks by RANSAC inliers; results say verified or not."""
    from fastapi.testclient import TestClient

    from cbir.engine import build_index
    from cbir.serve.app import create_app

    folder = tmp_path / "index"
    build_index(write_gallery(tmp_path / "photos"), folder, extractor="colour", local="sift", progress=False, workers=0, log=lambda m: None)
    with TestClient(create_app(make_config(folder))) as c:
        info = c.get("/info").json()["indexes"]["t"]
        assert info["local_features"] == "sift" and info["rerank_matcher"] in ("default", "mnn")
        for how in ("true", "mnn"):
            r = c.post(f"/search?top_k=4&rerank={how}&rerank_top=12", files={"image": ("q.jpg", query_bytes(1, "crop", "PNG"), "image/png")})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["rerank"]["matcher"] == (info["rerank_matcher"] if how == "true" else "mnn")
            assert body["rerank"]["features"] == "sift" and "rerank" in body["seconds"]
            res = body["results"]
            assert all("inliers" in x and "verified" in x for x in res)
            assert [x["verified"] for x in res][:2] == [True, True] and [x["label"] for x in res][:2] == ["group1", "group1"]
            assert res[0]["inliers"] >= body["rerank"]["min_inliers"]
            assert not any(x["verified"] for x in res[3:])  # a group has 3 images: the 4th is another group's
        # the plain matcher's verdict is the inlier floor
        assert all(x["verified"] == (x["inliers"] >= body["rerank"]["min_inliers"]) for x in res)
        s = c.get("/search/similar/img/g1_base.jpg?top_k=2&rerank=mnn").json()
        assert [x["label"] for x in s["results"]] == ["group1", "group1"] and s["results"][0]["verified"]
        assert "unknown re-ranker" in _err(c.post("/search?rerank=warp-drive", files={"image": ("q.jpg", query_bytes(1), "image/jpeg")}), 400)
        # re-ranking verifies the graph stage's shortlist, whatever it is (alpha-QE asked for here)
        r = c.post("/search?top_k=3&rerank=true&expand=true", files={"image": ("q.jpg", query_bytes(1), "image/jpeg")})
        assert r.status_code == 200, r.text
        assert [x["label"] for x in r.json()["results"]][:2] == ["group1", "group1"] and r.json()["results"][0]["verified"]



def test_the_default_cascade_re_ranks_an_index_built_with_the_default_local_features(tmp_path):
    from fastapi.testclient import TestClient

    from cbir.engine import build_index
    from cbir.serve.app import create_app

    folder = tmp_path / "index"
    build_index(write_gallery(tmp_path / "photos"), folder, extractor="colour", local="default", progress=False, workers=0, log=lambda m: None)
    with TestClient(create_app(make_config(folder))) as c:
        assert c.get("/info").json()["indexes"]["t"]["rerank_matcher"] == "default"
        r = c.post("/search?top_k=3&rerank=default&rerank_top=12", files={"image": ("q.jpg", query_bytes(1, "crop", "PNG"), "image/png")})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["rerank"]["matcher"] == "default" and [x["label"] for x in body["results"]][:2] == ["group1", "group1"]
        assert body["results"][0]["verified"] is True and all("inliers" in x for x in body["results"])

# ----------------------------------------------------------------------------------------------- deadlines on a real socket


def test_slow_upload_is_408_and_slow_work_is_504(gallery, monkeypatch):
    import socket

    from cbir.serve.app import create_app
    from serve.support import LiveServer

    app = create_app(make_config(gallery[1], timeout_s=1.0))
    srv = LiveServer(app, limit_s=60).start()
    try:
        host, port = srv.url.rsplit("/", 1)[-1].split(":")
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as s:  # announces 100 kB, sends 10 bytes, then waits
            s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                      b"Content-Length: 100000\r\n\r\n--x\r\nabcde")
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert time.monotonic() - t0 < 5
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b"did not complete" in reply
        # work that outlives the deadline where no stage checks it (here: a re-ranking gate held until the answer is in)
        release = threading.Event()
        monkeypatch.setattr(app.service.gate, "run", lambda fn, timeout, what: release.wait(60))
        try:
            status, out = _post(srv.url + "/match?name0=img/g0_base.jpg&name1=img/g0_flip.jpg", b"", {})
            assert status == 504 and "time limit" in json.loads(out)["error"]
            assert not release.is_set()  # answered by the deadline while the work still ran
        finally:
            release.set()
    finally:
        srv.join()


def test_sample_spreads_over_the_gallery(client):
    """GET /sample: what the empty page shows, rows spread evenly over the index, each with its thumbnail URL."""
    r = client.get("/sample?n=4")
    assert r.status_code == 200, r.text
    body = r.json()
    names = [x["name"] for x in body["images"]]
    assert body["count"] == GROUPS * 3 and len(names) == 4 and len(set(names)) == 4
    assert {x["label"] for x in body["images"]} == {f"group{g}" for g in range(GROUPS)}  # 4 of 12 rows in group order: one a group
    assert all(x["thumb"] == "/thumbs/" + x["name"] and "path" not in x for x in body["images"])
    assert len(client.get("/sample?n=200").json()["images"]) == GROUPS * 3
    _err(client.get("/sample?n=0"), 422)
