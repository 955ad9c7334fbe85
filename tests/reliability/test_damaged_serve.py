"""Issue 20.2: `cbir serve` (a child process on 127.0.0.1) on a damaged index refuses to start with one line naming the
file (rc 2), or, for a file it reads only when a query needs it (knn.h5 flipped), starts, says so naming the file, and
answers those queries with a JSON error naming it (never a ranking computed without it)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import write_textured

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from cbir.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-damaged")
    for c in range(2):
        for v in range(3):
            write_textured(root / "gallery" / f"class{c}" / f"im{v}.jpg", 1300 + 10 * c + v)
    assert main(["index", "build", str(root / "gallery"), "--labels", "folder", "--extractor", "colour", "--local", "default",
                 "--out", str(root / "idx"), "--quiet", "--workers", "0"]) == 0
    (root / "gallery" / "class0" / "im0.jpg").touch()
    assert main(["index", "sync", str(root / "idx"), "--quiet", "--workers", "0"]) == 0  # content.h5
    return root


def _copy(built, tmp_path, name, how):
    folder = tmp_path / "idx"
    shutil.copytree(built / "idx", folder)
    p = folder / name
    data = p.read_bytes()
    if how == "flip":
        b = bytearray(data)
        i = len(b) // 2
        b[i : i + 16] = bytes(x ^ 0xFF for x in b[i : i + 16])
        p.write_bytes(bytes(b))
    else:
        p.write_bytes(data[: len(data) // 2])
    return folder


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(folder, port):
    return subprocess.Popen([sys.executable, "-m", "cbir", "serve", "--index", str(folder), "--host", "127.0.0.1", "--port",
                             str(port), "--quiet"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("name, how", [("manifest.json", "truncate"), ("features.h5", "flip"), ("features.h5", "truncate"),
                                       ("cosine.faiss", "flip"), ("knn.h5", "truncate"), ("local.h5", "truncate"),
                                       ("content.h5", "truncate")])
def test_serve_refuses_a_damaged_index(built, tmp_path, name, how):
    """`cbir serve` on an index with FILE damaged (cut in half, or flipped where the open reads it) -> exits within 60 s,
    rc 2, one line naming FILE, nothing listening"""
    folder = _copy(built, tmp_path, name, how)
    proc = _serve(folder, _free_port())
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and str(folder / name) in lines[0], (proc.returncode, err[-2000:])


def test_serve_names_a_flipped_knn_graph_and_answers_with_an_error(built, tmp_path):
    """`cbir serve` on an index whose knn.h5 is flipped (read by the graph stage only) -> starts with a warning naming
    knn.h5; GET /search/similar/NAME -> a JSON error naming knn.h5 (status >= 400), not a ranking"""
    folder = _copy(built, tmp_path, "knn.h5", "flip")
    port = _free_port()
    proc = _serve(folder, port)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() is not None else "no answer"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"{base}/search/similar/class0/im1.jpg", timeout=30)
        body = json.loads(e.value.read().decode())
        assert e.value.code >= 400 and str(folder / "knn.h5") in body["error"], body
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert str(folder / "knn.h5") in err and "Traceback" not in err, err[-2000:]
