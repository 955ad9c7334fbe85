"""Helpers of the service tests (imported as ``serve.support``: setup.cfg puts tests/ on the path)."""

import threading
import time
from pathlib import Path

import numpy as np

from helpers import textured

GROUPS = 4
#: the first image of each group is its base; then a mirrored copy and a brighter one (colour histograms: near equal)
VARIANTS = ("base", "flip", "bright")


def _base(g: int) -> np.ndarray:
    """A 240x320 image of group ``g``: its own colours (for the colour index) and many small corners (for SIFT)."""
    import cv2

    img = textured(200 + g, h=240, w=320)
    rng = np.random.default_rng(300 + g)
    for _ in range(160):
        c = tuple(int(x) for x in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, 316)), int(rng.integers(0, 236))
        cv2.rectangle(img, (x, y), (x + int(rng.integers(2, 7)), y + int(rng.integers(2, 7))), c, -1)
    return img


def variant(g: int, v: str) -> np.ndarray:
    img = _base(g)
    if v == "flip":
        img = img[:, ::-1].copy()
    elif v == "bright":
        img = np.clip(img.astype(int) + 12, 0, 255).astype(np.uint8)
    elif v == "crop":  # a query, not in the gallery
        img = img[20:-20, 24:-24].copy()
    return img


def write_gallery(folder: Path, groups=range(GROUPS)):
    from PIL import Image

    from cbir.data import Entry

    (folder / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for g in groups:
        for v in VARIANTS:
            name = f"img/g{g}_{v}.jpg"
            Image.fromarray(variant(g, v)).save(folder / name, quality=95)
            entries.append(Entry(name, folder / name, f"group{g}"))
    return entries


def build(entries, out: Path) -> Path:
    from cbir.engine import build_index

    build_index(entries, out, extractor="colour", progress=False, workers=0, log=lambda m: None)
    return out


def query_bytes(g: int, v: str = "crop", fmt: str = "JPEG") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(variant(g, v)).save(buf, format=fmt)
    return buf.getvalue()


def make_config(folder, **kw):
    from cbir.serve.app import ServeConfig

    kw.setdefault("warm", False)
    kw.setdefault("match_features", "sift")
    kw.setdefault("match_matcher", "mnn")
    kw.setdefault("reload_s", 0)
    return ServeConfig(indexes={"t": str(folder)}, **kw)


class LiveServer:
    """uvicorn in a thread on 127.0.0.1 (a free port); stops at teardown, or by itself after ``limit_s``."""

    def __init__(self, app, limit_s: float = 240.0) -> None:
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="test-live-server", daemon=True)
        self.timer = threading.Timer(limit_s, self.stop)
        self.timer.daemon = True

    def start(self) -> "LiveServer":
        self.thread.start()
        self.timer.start()
        t0 = time.monotonic()
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() - t0 > 60:
                raise RuntimeError("the test server did not start within 60 s")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def stop(self) -> None:
        self.server.should_exit = True

    def join(self) -> None:
        self.stop()
        self.timer.cancel()
        self.thread.join(timeout=30)


# ----------------------------------------------------------------------------------------------- raw HTTP, a real `cbir serve`


def raw_http(port: int, request: bytes, timeout: float = 30.0, limit: int = 1 << 20):
    """Send ``request`` as is (no client-side normalisation of the path: ``..``, ``%2e``, NUL, backslashes reach the
    server) to 127.0.0.1:``port``; returns ``(status, headers, body)`` of the answer (status 0: the connection closed
    with no answer). Reads until the server closes or ``limit`` bytes."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while len(data) < limit:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                hs = _headers(head)
                if "content-length" in hs and len(body) >= int(hs["content-length"]):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/"):
        return 0, {}, data
    return int(head.split(b" ", 2)[1]), _headers(head), body


def _headers(head: bytes):
    out = {}
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        out[k.strip().lower()] = v.strip()
    return out


def get_request(target: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
    """A GET request line + headers for ``target`` exactly as given (``target`` may hold any byte but CR/LF)."""
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode("latin-1")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` now (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory process ``pid`` ever held (Linux /proc VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


class ServeProcess:
    """``cbir serve`` as a child process on 127.0.0.1 (a free port), stopped (SIGKILL at the latest) by :meth:`stop`."""

    def __init__(self, index, *args: str, log_path=None) -> None:
        import os
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        repo = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": str(repo)}
        env.pop("CBIR_TOKEN", None)
        self.log_path = log_path
        self.log = open(log_path, "ab") if log_path else None
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-m", "cbir", "serve", "--index", f"t={index}", "--host", "127.0.0.1",
                                      "--port", str(self.port), "--no-warm", "--quiet", *args], env=env,
                                     stdout=self.log or subprocess.DEVNULL, stderr=self.log or subprocess.DEVNULL)

    def wait_ready(self, limit_s: float = 120.0) -> "ServeProcess":
        import httpx

        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cbir serve exited with {self.proc.returncode}" + (f"; log: {self.log_path}" if self.log_path else ""))
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"cbir serve did not answer /health within {limit_s:.0f} s")

    def kill(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001 - it did not stop in time: killed
                self.kill()
        if self.log:
            self.log.close()


def multipart(parts, boundary: str = "cbirtestboundary") -> tuple:
    """``(body, headers)`` of a multipart/form-data request: ``parts`` are ``(field, filename or None, bytes)``."""
    body = b""
    for field, filename, data in parts:
        disp = f'form-data; name="{field}"' + (f'; filename="{filename}"' if filename is not None else "")
        body += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if filename is not None:
            body += b"Content-Type: application/octet-stream\r\n"
        body += b"\r\n" + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def post_request(target: str, body: bytes = b"", headers=None, host: str = "127.0.0.1", method: str = "POST") -> bytes:
    hs = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{hs}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            .encode("latin-1") + body)


def bomb_png(side: int = 20000) -> bytes:
    """A ``side`` x ``side`` single-colour 8-bit grey PNG, written row by row (never the pixels in memory): ~400 kB
    that decodes to ``side**2`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * side  # filter byte 0, then the grey value
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def chromium():
    """Debian's chromium under Playwright, as a context manager yielding the browser; ``pytest.skip`` where either is missing."""
    import contextlib
    import os

    import pytest

    @contextlib.contextmanager
    def launched():
        exe = os.environ.get("CBIR_CHROMIUM", "/usr/bin/chromium")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            pytest.skip("playwright is not installed (pip install playwright; the browser is Debian's chromium, never downloaded)")
        if not os.path.exists(exe):
            pytest.skip(f"{exe} not found: apt-get install -y chromium (.ci/run does it when it runs as root)")
        pw = sync_playwright().start()
        try:
            b = pw.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
                                   timeout=60_000)
        except Exception as e:  # noqa: BLE001 - a browser that cannot start here is a skip, with the reason
            pw.stop()
            pytest.skip(f"chromium at {exe} does not start under Playwright: {str(e).splitlines()[0]}")
        try:
            yield b
        finally:
            b.close()
            pw.stop()

    return launched()
