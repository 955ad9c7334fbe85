"""Fixtures of the service tests: a small gallery indexed with the cheap ``colour`` extractor (no weights, milliseconds
per image), apps over it, and a live server on 127.0.0.1 that stops by itself."""

import pytest

pytest.importorskip("fastapi", reason="cbir serve needs FastAPI: pip install 'cbir[serve]'")
pytest.importorskip("python_multipart", reason="cbir serve needs python-multipart: pip install 'cbir[serve]'")

from serve.support import LiveServer, build, make_config, write_gallery  # noqa: E402


@pytest.fixture(scope="session")
def gallery(tmp_path_factory):
    """``(root, index folder)``: 4 groups x 3 images, and a file beside them that no request may read."""
    root = tmp_path_factory.mktemp("serve_gallery")
    entries = write_gallery(root / "photos")
    (root / "photos" / "secret.txt").write_text("TOP-SECRET-CONTENT\n")
    (root / "secret.txt").write_text("TOP-SECRET-CONTENT\n")
    return root, build(entries, root / "index")


@pytest.fixture(scope="module")
def client(gallery):
    """A TestClient over the shared gallery (read-only, 1 MB upload limit)."""
    from fastapi.testclient import TestClient

    from cbir.serve.app import MB, create_app

    app = create_app(make_config(gallery[1], max_upload_bytes=1 * MB))
    with TestClient(app) as c:  # runs the lifespan: batcher threads start and stop with it
        c.service = app.service
        yield c


@pytest.fixture(scope="session")
def live_server(gallery):
    from cbir.serve.app import MB, create_app

    app = create_app(make_config(gallery[1], max_upload_bytes=1 * MB))
    srv = LiveServer(app).start()
    yield srv
    srv.join()
    assert not srv.thread.is_alive(), "the live test server did not stop"


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium driven by Playwright, started once per session; skips cleanly where either is missing."""
    from serve.support import chromium

    with chromium() as b:
        yield b
