"""Issue 20.3: the service under attack, against a real ``cbir serve`` on 127.0.0.1 spoken to over raw sockets (no client
normalises a path): names that try to leave the gallery, HTML in names and labels, hostile uploads and parameters,
foreign hosts and origins, writes and tokens."""

import hashlib
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi", reason="cbir serve needs FastAPI: pip install 'cbir[serve]'")
pytest.importorskip("python_multipart", reason="cbir serve needs python-multipart: pip install 'cbir[serve]'")

from serve.support import (ServeProcess, bomb_png, build, chromium, get_request, multipart, post_request,  # noqa: E402
                           query_bytes, raw_http, variant, write_gallery)

SECRET = b"TOP-SECRET-CONTENT"
UPLOAD_MB = 2


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """``(root, index)``: 12 gallery images under root/photos, secrets beside and above them that no request may read."""
    root = tmp_path_factory.mktemp("attacks")
    entries = write_gallery(root / "photos")
    (root / "photos" / "secret.txt").write_bytes(SECRET + b"\n")
    (root / "photos" / "img" / "secret.jpg").write_bytes(SECRET + b"\n")  # beside the images, not indexed
    (root / "secret.txt").write_bytes(SECRET + b"\n")
    return root, build(entries, root / "index")


def _serve(request, index, *args):
    srv = ServeProcess(index, "--max-upload-mb", str(UPLOAD_MB), *args, log_path=Path(index).parent / "serve.log").wait_ready()
    request.addfinalizer(srv.stop)
    return srv


@pytest.fixture(scope="module")
def ro(request, site):
    """A read-only ``cbir serve`` of the site's index."""
    return _serve(request, site[1], "--timeout", "20")


@pytest.fixture(scope="module")
def ro_slow(request, site):
    """A read-only ``cbir serve`` with a short request time limit: ``(server, timeout_s)``."""
    return _serve(request, site[1], "--timeout", "5"), 5.0


@pytest.fixture(scope="module")
def rw(request, site, tmp_path_factory):
    """A ``cbir serve --allow-write`` of a copy of the site's index (uploads kept in its own folder)."""
    import shutil

    root = tmp_path_factory.mktemp("attacks_rw")
    shutil.copytree(site[1], root / "index")
    srv = _serve(request, root / "index", "--allow-write", "--upload-dir", str(root / "uploads"), "--timeout", "20")
    srv.root = root
    return srv


def _tree(root: Path):
    """Every file under ``root`` with its size and SHA-256 (what a refused request must leave as it was)."""
    return {str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".log")}


def _json_error(status, headers, body, what):
    assert 400 <= status < 500, (what, status, body[:200])
    assert headers.get("content-type", "").startswith("application/json"), (what, status, headers, body[:200])
    err = json.loads(body)
    assert err["status"] == status and isinstance(err["error"], str) and err["error"], (what, err)
    return err["error"]


def _no_secret(body, what):
    assert SECRET not in body and b"root:x:" not in body, (what, body[:200])


# ----------------------------------------------------------------------------------------------- names that leave the gallery


def _traversals(site):
    """Names that point outside the gallery (or at a file in it that is not an indexed image), as they go on the wire."""
    root = site[0]
    absolute = str(root / "secret.txt")
    return ["../secret.txt", "../../secret.txt", "img/../../secret.txt", "img/../../../../../../etc/passwd", "secret.txt",
            "img/secret.jpg", "%2e%2e%2fsecret.txt", "%2e%2e/%2e%2e/secret.txt", "..%2f..%2fsecret.txt", "%2E%2E%2F%2E%2E%2Fsecret.txt",
            "%252e%252e%252fsecret.txt", "....//....//secret.txt", "/etc/passwd", "%2Fetc%2Fpasswd", absolute, quote(absolute, safe=""),
            "img/g0_base.jpg%00", "%00../secret.txt", "img/g0_base.jpg%00/../../secret.txt", "..\\secret.txt",
            "img\\..\\..\\secret.txt", "%5c..%5csecret.txt", "img%5c..%5c..%5csecret.txt", "..%5c..%5csecret.txt"]


def test_path_traversal_on_every_route_taking_a_name(ro, rw, site):
    """`../`, `%2e%2e%2f`, absolute paths, NUL bytes, backslashes as a name on /images, /thumbs, /search/similar, DELETE /images, /match name0/name1, ?index=, /static, /docs-assets -> 4xx JSON, no byte of a file outside the gallery, nothing deleted"""
    before = _tree(site[0]), _tree(rw.root)
    asked = 0
    for name in _traversals(site):
        lead = "" if name.startswith("/") else "/"
        for srv, req in [(ro, get_request(f"/images{lead}{name}")), (ro, get_request(f"/thumbs{lead}{name}")),
                         (ro, get_request(f"/search/similar{lead}{name}")), (ro, get_request(f"/static{lead}{name}")),
                         (ro, get_request(f"/docs-assets{lead}{name}")), (ro, get_request(f"/info?index={name}")),
                         (ro, get_request(f"/sample?index={name}")), (ro, post_request(f"/match?name0={name}&name1=img/g0_base.jpg")),
                         (ro, post_request(f"/match?name0=img/g0_base.jpg&name1={name}")),
                         (rw, post_request(f"/images{lead}{name}", method="DELETE"))]:
            status, headers, body = raw_http(srv.port, req)
            what = req.split(b"\r\n", 1)[0].decode("latin-1")
            _no_secret(body, what)
            _json_error(status, headers, body, what)
            asked += 1
    # a raw NUL or backslash byte in the request line: refused by the HTTP parser or by the app, never served
    for target in ["/images/img/g0_base.jpg\x00", "/images/\x00../secret.txt", "/images/..\\..\\secret.txt"]:
        status, headers, body = raw_http(ro.port, get_request(target))
        _no_secret(body, repr(target))
        assert status == 0 or 400 <= status < 500, (repr(target), status, body[:200])
    assert asked == 10 * len(_traversals(site))
    assert (_tree(site[0]), _tree(rw.root)) == before  # nothing read was changed, nothing deleted


def test_path_traversal_in_the_name_of_an_added_image(rw):
    """POST /images with a name that leaves the gallery (`../x.jpg`, `/tmp/x.jpg`, NUL, backslash, `img/../../x.jpg`) -> 400 JSON, no file written anywhere, index unchanged"""
    before = _tree(rw.root)
    names = ["../x.jpg", "../../x.jpg", "/tmp/x.jpg", "img/../../x.jpg", "a\x00b.jpg", "..\\x.jpg", "img\\..\\..\\x.jpg", "./x.jpg",
             "img//x.jpg", " x.jpg", "x.jpg/..", "%2e%2e/x.jpg"]
    for n in names:
        body, hs = multipart([("image", "q.jpg", query_bytes(3, "flip")), ("name", None, n.encode())])
        status, headers, out = raw_http(rw.port, post_request("/images", body, hs))
        msg = _json_error(status, headers, out, repr(n))
        assert status == 400 and "name" in msg, (n, status, msg)
    # a file name (not a name) with the same tricks is reduced to its last part: stored in the upload folder only
    body, hs = multipart([("image", "../../evil\\..\\x.jpg", query_bytes(3, "flip"))])
    status, headers, out = raw_http(rw.port, post_request("/images", body, hs))
    assert status == 201, out[:300]
    added = json.loads(out)["added"]
    assert added.startswith("uploads/") and ".." not in added and "\\" not in added
    after = _tree(rw.root)
    new = sorted(set(after) - set(before))
    assert all(p.startswith("uploads/") or p.startswith("index/") for p in new), new
    assert len([p for p in new if p.startswith("uploads/")]) == 1
    status, headers, out = raw_http(rw.port, post_request("/images/" + quote(added), method="DELETE"))
    assert status == 200, out[:300]


# ----------------------------------------------------------------------------------------------- HTML and script in names and labels

HOSTILE_LABEL = "<script>window.pwned='label'</script>"
HOSTILE_NAME = "img/<img src=x onerror=window.pwned=1>.jpg"


@pytest.fixture(scope="module")
def hostile(request, tmp_path_factory):
    """A ``cbir serve`` of an index whose labels and file names are HTML with script."""
    from PIL import Image

    from cbir.data import Entry

    root = tmp_path_factory.mktemp("hostile")
    entries = []
    for g, (name, label) in enumerate([(HOSTILE_NAME, HOSTILE_LABEL), ("img/\"quoted' & <b>bold</b>.jpg", "<b onmouseover=alert(1)>b</b>"),
                                       ("img/plain.jpg", "plain")]):
        for v in ("base", "flip"):
            n = name.replace(".jpg", f"_{v}.jpg")
            (root / "photos" / n).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(variant(g, v)).save(root / "photos" / n, format="JPEG")
            entries.append(Entry(n, root / "photos" / n, label))
    return _serve(request, build(entries, root / "index"))


def test_html_in_labels_and_names_is_data_in_json(hostile):
    """labels and file names holding HTML/script, in every JSON answer (/info, /sample, /search, /search/similar, a 404 echoing one) -> the exact string as JSON data, served as application/json with nosniff, never text/html"""
    import httpx

    url = hostile.url
    answers = [httpx.get(f"{url}/info"), httpx.get(f"{url}/sample"),
               httpx.get(f"{url}/search/similar/{quote(HOSTILE_NAME.replace('.jpg', '_base.jpg'))}?top_k=5"),
               httpx.post(f"{url}/search?top_k=5", files={"image": ("<script>x</script>.jpg", query_bytes(0), "image/jpeg")}),
               httpx.get(f"{url}/images/{quote('<script>alert(1)</script>')}")]
    for r in answers:
        assert r.headers["content-type"].startswith("application/json") and r.headers["x-content-type-options"] == "nosniff", r.url
    info = answers[0].json()["indexes"]["t"]
    assert HOSTILE_LABEL in info["labels"]
    names = {x["name"] for x in answers[1].json()["images"]}
    assert HOSTILE_NAME.replace(".jpg", "_base.jpg") in names
    assert answers[2].status_code == 200 and answers[2].json()["results"][0]["label"] == HOSTILE_LABEL
    assert answers[3].status_code == 200 and answers[3].json()["query"]["name"] == "<script>x</script>.jpg"
    assert answers[4].status_code == 404 and "<script>alert(1)</script>" in answers[4].json()["error"]


def test_html_in_labels_and_names_is_text_on_the_page(hostile):
    """the page showing labels and names that hold HTML/script (the sample, the label list, a result grid) -> shown as text: no element or script injected, nothing runs"""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(hostile.url + "/", timeout=30_000)
            page.wait_for_selector("#sample-grid figure", timeout=30_000)
            options = page.locator("#label option").all_inner_texts()
            assert HOSTILE_LABEL in options, options
            caps = page.locator("#sample-grid figcaption").all_inner_texts()
            assert HOSTILE_LABEL in caps, caps
            page.locator("#sample-grid figure").first.locator("img").click()
            page.wait_for_selector("#results .result", timeout=30_000)
            assert HOSTILE_LABEL in page.locator("#results .result .label").all_inner_texts()
            assert any("<img src=x" in t for t in page.locator("#results .result .name").all_inner_texts() + [page.locator("#query-caption").inner_text()])
            assert page.evaluate("() => window.pwned") is None
            assert page.evaluate("() => document.scripts.length") == 1  # app.js only
            assert page.evaluate("() => document.querySelectorAll('[onerror],[onmouseover],b').length") == 0
        finally:
            page.close()
    assert not errors, errors


def test_the_page_csp_forbids_inline_script(ro):
    """the page's Content-Security-Policy, and an inline script put into the page -> script-src 'self' only (no 'unsafe-inline'/'unsafe-eval'), the inline script does not run"""
    status, headers, body = raw_http(ro.port, get_request("/"))
    assert status == 200
    csp = {d.split()[0]: d.split()[1:] for d in headers["content-security-policy"].split(";") if d.strip()}
    assert csp["script-src"] == ["'self'"] and csp["default-src"] == ["'none'"] and csp["base-uri"] == ["'none'"], csp
    assert b"<script>" not in body and b"onclick" not in body.lower() and b"onload" not in body.lower()  # the page has no inline script
    with chromium() as browser:
        page = browser.new_page()
        try:
            page.goto(ro.url + "/", timeout=30_000)
            page.wait_for_function("() => document.getElementById('summary').textContent.includes('images')", timeout=30_000)
            try:
                page.add_script_tag(content="window.inlineRan = 1")
            except Exception:  # noqa: BLE001 - Playwright reports the refused script; what counts is that it did not run
                pass
            page.evaluate("() => { const s = document.createElement('script'); s.textContent = 'window.inlineRan = 2'; document.body.appendChild(s); }")
            assert page.evaluate("() => window.inlineRan") is None
        finally:
            page.close()


# ----------------------------------------------------------------------------------------------- hostile uploads


def test_non_image_uploads(ro, rw):
    """text, HTML, SVG, PDF, ZIP, ELF, random bytes, an empty file as the image of /search, /match and POST /images -> 4xx JSON (415 not an image, 400 empty), nothing added"""
    import os

    kinds = {"notes.txt": b"just text\n" * 50, "page.html": b"<html><script>alert(1)</script></html>",
             "vector.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
             "doc.pdf": b"%PDF-1.4\n" + os.urandom(2000), "a.zip": b"PK\x03\x04" + os.urandom(2000),
             "prog": b"\x7fELF\x02\x01\x01" + os.urandom(2000), "noise.jpg": os.urandom(5000), "empty.jpg": b""}
    before = _tree(rw.root)
    for srv, target, field in [(ro, "/search", "image"), (ro, "/match?name1=img/g0_base.jpg", "image0"), (rw, "/images", "image")]:
        for fname, data in kinds.items():
            body, hs = multipart([(field, fname, data)])
            status, headers, out = raw_http(srv.port, post_request(target, body, hs))
            msg = _json_error(status, headers, out, f"{target} {fname}")
            assert status == (400 if not data else 415), (target, fname, status, msg)
    assert _tree(rw.root) == before


def test_decompression_bomb(ro, rw):
    """a 20000x20000 single-colour PNG (432 kB on the wire) to /search, /match and POST /images -> 413 JSON naming the pixel limit; the server's peak memory grows by far less than the 400 MB its pixels would take"""
    from serve.support import peak_rss_bytes

    bomb = bomb_png(20000)
    assert len(bomb) < 1_000_000
    for srv, target, field in [(ro, "/search", "image"), (ro, "/match?name1=img/g0_base.jpg", "image0"), (rw, "/images", "image")]:
        peak = peak_rss_bytes(srv.proc.pid)
        body, hs = multipart([(field, "bomb.png", bomb)])
        status, headers, out = raw_http(srv.port, post_request(target, body, hs))
        msg = _json_error(status, headers, out, target)
        assert status == 413 and "pixels" in msg and "bomb.png" in msg, msg
        grown = peak_rss_bytes(srv.proc.pid) - peak
        assert grown < 20000 * 20000 // 4, f"{target}: peak RSS grew by {grown / 2**20:.0f} MiB"


def test_truncated_jpegs(ro):
    """a JPEG cut after its header, 10 %, 50 % and 90 % of its bytes (and after its 2-byte SOI marker), to /search and /match -> 400 JSON saying truncated or corrupt (415 not an image)"""
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(variant(1, "base")).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    cuts = {"soi": 2, "header": 300, "10%": len(data) // 10, "50%": len(data) // 2, "90%": len(data) * 9 // 10}
    for target, field in [("/search", "image"), ("/match?name1=img/g0_base.jpg", "image0")]:
        for what, n in cuts.items():
            body, hs = multipart([(field, f"cut-{what}.jpg", data[:n])])
            status, headers, out = raw_http(ro.port, post_request(target, body, hs))
            msg = _json_error(status, headers, out, f"{target} {what}")
            if what == "soi":  # two bytes are no recognisable format yet
                assert status == 415 and "not an image" in msg, (what, msg)
            else:
                assert status == 400 and ("truncated" in msg or "corrupt" in msg), (what, msg)


def test_over_size_bodies(ro):
    """a body over the limit declared by Content-Length (10 GB, nothing sent), sent whole, sent chunked, and one file over the limit inside an allowed body -> 413 JSON, the declared one at once"""
    limit = UPLOAD_MB * 2**20
    t0 = time.monotonic()
    req = (f"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
           f"Content-Length: {10 * 2**30}\r\nConnection: close\r\n\r\n").encode()
    status, headers, out = raw_http(ro.port, req)
    assert "too large" in _json_error(status, headers, out, "declared") and status == 413
    assert time.monotonic() - t0 < 20  # answered before the request's time limit (--timeout 20): nothing was waited for
    body, hs = multipart([("image", "big.jpg", b"\xff" * (2 * limit))])
    status, headers, out = raw_http(ro.port, post_request("/search", body, hs))
    assert status == 413 and "too large" in _json_error(status, headers, out, "whole")
    head = b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=cbirtestboundary\r\n" \
           b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    chunks = b"".join(b"%x\r\n" % len(c) + c + b"\r\n" for c in [body[i:i + 65536] for i in range(0, len(body), 65536)]) + b"0\r\n\r\n"
    status, headers, out = raw_http(ro.port, head + chunks)
    assert status == 413 and "too large" in _json_error(status, headers, out, "chunked")
    body, hs = multipart([("image", "just-over.jpg", b"\xff" * (limit + 1))])  # the body is within limit + form overhead
    status, headers, out = raw_http(ro.port, post_request("/search", body, hs))
    assert status == 413 and "just-over.jpg" in _json_error(status, headers, out, "file")


def test_fifty_file_multiparts(ro, rw):
    """a multipart of 50 files (one field repeated, or 50 fields) to /search, /match and POST /images -> 400 JSON saying how many files the route takes, nothing added"""
    before = _tree(rw.root)
    small = query_bytes(0)
    for srv, target, field in [(ro, "/search", "image"), (ro, "/match", "image0"), (rw, "/images", "image")]:
        for parts in ([(field, f"q{i}.jpg", small) for i in range(50)], [(f"f{i}", f"q{i}.jpg", small) for i in range(49)] + [(field, "q.jpg", small)]):
            body, hs = multipart(parts)
            status, headers, out = raw_http(srv.port, post_request(target, body, hs))
            msg = _json_error(status, headers, out, target)
            assert status == 400 and "file" in msg, (target, status, msg)
    assert _tree(rw.root) == before


@pytest.mark.parametrize("param", ["top_k", "rerank_top", "qe_k"])
def test_bad_numbers_in_search_parameters(ro, param):
    """top_k (and rerank_top, qe_k) of 0, -1, 10^9 and non-numbers (abc, 1.5, 1e3, 0x10, NaN, 400 digits) on /search and /search/similar -> 422 JSON naming the parameter"""
    for v in ["0", "-1", str(10**9), "abc", "1.5", "1e3", "0x10", "NaN", "9" * 400]:
        for srv_req in [post_request(f"/search?{param}={v}", *multipart([("image", "q.jpg", query_bytes(0))])),
                        get_request(f"/search/similar/img/g0_base.jpg?{param}={v}")]:
            status, headers, out = raw_http(ro.port, srv_req)
            msg = _json_error(status, headers, out, f"{param}={v}")
            assert status == 422 and param in msg, (param, v, status, msg)


def _search_while_alive(srv, threads):
    """Search with a normal client every 0.2 s while any of ``threads`` runs (at most 200 times); the statuses seen."""
    import httpx

    served = []
    while any(t.is_alive() for t in threads) and len(served) < 200:
        r = httpx.post(f"{srv.url}/search?top_k=2", files={"image": ("q.jpg", query_bytes(1), "image/jpeg")}, timeout=60)
        served.append(r.status_code)
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=70)
    return served


def _assert_cut_by_deadline(answers, timeout_s):
    """Each slow connection got a 408 JSON, cut by the server's request time limit, not by the client giving up."""
    for k, (took, data) in sorted(answers.items()):
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and json.loads(body)["status"] == 408, (k, data[:200])
        assert timeout_s * 0.9 <= took <= 2 * timeout_s + 5, (k, took)


def test_slow_bodies(ro_slow):
    """slowloris: 12 uploads trickling their bodies a byte every 0.3 s, while another client searches -> each slow one 408 JSON by the request time limit (--timeout 5 here; 60 s, a minute, by default), every other search 200"""
    import socket
    import threading

    srv, timeout_s = ro_slow
    socks, answers = [], {}
    head = (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 100000\r\n\r\n")

    def trickle(k, s):
        t0 = time.monotonic()
        data = b""
        try:
            while time.monotonic() - t0 < 60 and b"}" not in data:  # bounded to a minute
                try:
                    s.sendall(b"x")
                except OSError:
                    pass
                s.settimeout(0.3)
                try:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                except socket.timeout:
                    pass
        finally:
            answers[k] = (time.monotonic() - t0, data)

    for k in range(12):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(head + b"--x\r\n")
        socks.append(s)
    threads = [threading.Thread(target=trickle, args=(k, s), daemon=True) for k, s in enumerate(socks)]
    for t in threads:
        t.start()
    try:
        served = _search_while_alive(srv, threads)
    finally:
        for s in socks:
            s.close()
    assert served and set(served) == {200}, served
    assert len(answers) == 12
    _assert_cut_by_deadline(answers, timeout_s)


def test_slow_headers(ro_slow):
    """slowloris on the headers: 12 connections sending a header byte every 0.3 s (and one sending nothing), while another client searches -> each 408 JSON and closed by the request time limit (--timeout 5 here; a minute by default), every other search 200"""
    import socket
    import threading

    srv, timeout_s = ro_slow
    answers = {}

    def trickle(k):
        t0 = time.monotonic()
        data = b""
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " if k else b"")
            s.settimeout(0.3)
            while time.monotonic() - t0 < 60:  # bounded to a minute
                try:
                    if k:
                        s.sendall(b"a")
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                except socket.timeout:
                    pass
                except OSError:
                    break
        answers[k] = (time.monotonic() - t0, data)

    threads = [threading.Thread(target=trickle, args=(k,), daemon=True) for k in range(13)]
    for t in threads:
        t.start()
    served = _search_while_alive(srv, threads)
    assert served and set(served) == {200}, served
    assert len(answers) == 13
    _assert_cut_by_deadline(answers, timeout_s)


# ----------------------------------------------------------------------------------------------- who may ask


def test_wrong_host_and_cross_site_origin(ro, rw):
    """a Host that is not the loopback's (DNS rebinding), and POST/DELETE from a cross-site, other-port or opaque Origin -> 421 / 403 JSON, no write; a cross-site GET gets no CORS grant"""
    before = _tree(rw.root)
    for host in ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil.example", "10.0.0.1"]:
        status, headers, out = raw_http(ro.port, get_request("/info", host=host))
        assert status == 421 and "rebinding" in _json_error(status, headers, out, host)
    body, hs = multipart([("image", "q.jpg", query_bytes(0))])
    here = f"127.0.0.1:{rw.port}"
    for origin in ["http://evil.example", f"http://127.0.0.1:{rw.port + 1}", "null", f"http://{here}.evil.example"]:
        for req in [post_request("/search", body, {**hs, "Origin": origin}, host=here),
                    post_request("/images", body, {**hs, "Origin": origin}, host=here),
                    post_request("/images/img/g0_base.jpg", b"", {"Origin": origin}, host=here, method="DELETE")]:
            status, headers, out = raw_http(rw.port, req)
            assert status == 403 and "origin" in _json_error(status, headers, out, origin).lower()
    status, headers, _ = raw_http(ro.port, get_request("/info", extra="Origin: http://evil.example\r\n"))
    assert status == 200 and not any(k.startswith("access-control-") for k in headers)
    status, _, _ = raw_http(rw.port, post_request("/search", body, {**hs, "Origin": f"http://{here}"}, host=here))
    assert status == 200  # the page's own origin may
    assert _tree(rw.root) == before


def test_write_routes_need_allow_write(ro, site):
    """POST /images and DELETE /images/NAME on a service started without --allow-write -> 403 JSON naming --allow-write; the index and its folder unchanged"""
    before = _tree(site[0])
    body, hs = multipart([("image", "q.jpg", query_bytes(0)), ("name", None, b"img/new.jpg")])
    for req in [post_request("/images", body, hs), post_request("/images/img/g0_base.jpg", method="DELETE"),
                post_request("/images/nope.jpg", method="DELETE")]:
        status, headers, out = raw_http(ro.port, req)
        assert status == 403 and "--allow-write" in _json_error(status, headers, out, req[:30])
    assert _tree(site[0]) == before


def test_off_loopback_needs_a_token(site, tmp_path):
    """`cbir serve --host` an address off the loopback without --token, and the data routes of a served token without it -> exit 2 with one line naming --token, nothing bound; 401 JSON on every data route"""
    import os

    env = {k: v for k, v in os.environ.items() if k != "CBIR_TOKEN"}
    repo = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = str(repo)
    # 192.0.2.1 is TEST-NET-1: not an address of this machine, so even a broken check could not listen anywhere
    p = subprocess.run([sys.executable, "-m", "cbir", "serve", "--index", str(site[1]), "--host", "192.0.2.1", "--port", "0"],
                       env=env, capture_output=True, text=True, timeout=120)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "--token" in lines[0] and "Traceback" not in p.stderr, (p.returncode, p.stderr[-600:])

    token = "t" * 24
    srv = ServeProcess(site[1], "--token", token, log_path=tmp_path / "serve.log").wait_ready()
    try:
        import httpx

        spec = httpx.get(srv.url + "/openapi.json").json()
        open_paths = {"/", "/health", "/docs", "/openapi.json", "/static/app.js", "/static/style.css"}
        checked = 0
        for path, methods in spec["paths"].items():
            concrete = path.replace("{name}", "img/g0_base.jpg")
            if concrete in open_paths:
                continue
            for method in methods:
                r = httpx.request(method.upper(), srv.url + concrete, timeout=30)
                assert r.status_code == 401 and r.json()["status"] == 401, (method, path, r.status_code, r.text[:200])
                checked += 1
        assert checked >= 10, checked
        ok = httpx.get(srv.url + "/search/similar/img/g0_base.jpg", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    finally:
        srv.stop()
