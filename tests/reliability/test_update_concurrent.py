"""Issue 20.1: updates of one index side by side. A second update while one runs is refused at once with the holder's pid
(nothing changed); a query (library and CLI) running while updates replace the folder answers from the old index or
the new one, never with an error or a mix."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import write_textured

from cbir.cli import main
from cbir.data import Entry
from cbir.engine import Index, add_images, build_index, verify_index
from cbir.index import folder as layout

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
N, MOVED = 12, 3  # gallery size; images the updater takes out and puts back

#: an `index add` that stops inside its extraction, holding the lock, until killed (writes READY first)
HELD_ADD = r"""
import sys, time
from pathlib import Path
from cbir import update
from cbir.data import Entry
real = update.extract_rows
def held(*a, **k):
    Path(sys.argv[3]).write_text("ready")
    time.sleep(120)
    return real(*a, **k)
update.extract_rows = held
update.add_images(sys.argv[1], [Entry("new.jpg", Path(sys.argv[2]))], progress=False, workers=0)
"""

#: remove MOVED images, add them back, compact; again and again until DEADLINE (one line printed per swap)
UPDATER = r"""
import sys, time
from pathlib import Path
from cbir.data import Entry
from cbir.engine import add_images, compact_index, remove_images
folder, gallery, deadline = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
moved = [Entry(f"im{i}.jpg", gallery / f"im{i}.jpg", f"c{i % 3}") for i in range(3)]
while time.time() < deadline:
    remove_images(folder, [e.name for e in moved], log=lambda m: None); print("removed", flush=True)
    add_images(folder, moved, progress=False, workers=0); print("added", flush=True)
    compact_index(folder); print("compacted", flush=True)
"""


EXTRACTORS = {"colour": dict(extractor="colour"),  # with a k-NN graph (knn.h5, read at query time)
              "hash": dict(extractor="hash", conf={"base": "colour", "base_conf": {}})}  # learned state (extractor.h5)


@pytest.fixture
def idx(tmp_path, request):
    gallery = tmp_path / "gallery"
    entries = []
    for i in range(N):
        write_textured(gallery / f"im{i}.jpg", 700 + i)
        entries.append(Entry(f"im{i}.jpg", gallery / f"im{i}.jpg", f"c{i % 3}"))
    build_index(entries, tmp_path / "idx", **EXTRACTORS[getattr(request, "param", "colour")], progress=False, workers=0)
    write_textured(tmp_path / "new.jpg", 799)
    return tmp_path / "idx", gallery, tmp_path / "new.jpg"


def _snap(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def held(idx, tmp_path):
    """An add holding the index's lock (a child process): yields its pid; killed afterwards."""
    out, _, new = idx
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", HELD_ADD, str(out), str(new), str(ready)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "the add did not start"
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=60)


@pytest.mark.parametrize("what", ["add", "remove", "compact", "sync"])
def test_a_second_update_is_refused_with_the_holders_pid(idx, held, capsys, what):
    """`index add/remove/compact/sync` while another add holds the index -> one line "another build or update (pid PID)
    is writing DIR", rc 2, the index unchanged; once the holder is gone (killed) the same update runs"""
    out, gallery, new = idx
    before = _snap(out)
    lst = out.parent / "l.txt"
    lst.write_text(f"{new}\n")
    args = {"add": ["index", "add", "--index", str(out), "--list", str(lst), "--quiet", "--workers", "0"],
            "remove": ["index", "remove", "--index", str(out), "im0.jpg"], "compact": ["index", "compact", str(out)],
            "sync": ["index", "sync", str(out), str(gallery), "--quiet", "--workers", "0"]}[what]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"another build or update (pid {held}) is writing {out}" in err[0], err
    assert _snap(out) == before
    os.kill(held, signal.SIGKILL)
    deadline = time.time() + 30
    while time.time() < deadline:  # the lock goes with the process
        try:
            os.kill(held, 0)
            os.waitpid(held, os.WNOHANG)
        except (ProcessLookupError, ChildProcessError):
            break
        time.sleep(0.05)
    assert main(args) == 0, capsys.readouterr().err
    assert verify_index(out)["ok"]


def test_the_library_raises_locked_naming_the_holder(idx, held):
    """add_images() while another add holds the index -> cbir.index.folder.Locked naming the holder's pid"""
    out, _, new = idx
    with pytest.raises(layout.Locked, match=rf"pid {held}\)"):
        add_images(out, [Entry("new2.jpg", new)], progress=False, workers=0)


def _updater(idx, seconds):
    out, gallery, _ = idx
    return subprocess.Popen([sys.executable, "-c", UPDATER, str(out), str(gallery), str(time.time() + seconds)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("idx", sorted(EXTRACTORS), indirect=True)
def test_queries_while_updates_replace_the_folder(idx):
    """library open + query in a loop while a child removes / adds back / compacts the index -> one version each, no error

    8 s of queries; colour has a k-NN graph (knn.h5, read at query time), hash learned state (extractor.h5). Every
    answer comes from one whole version: 12 or 9 images, each size always with the same ranking."""
    out, gallery, _ = idx
    query = gallery / "im5.jpg"
    proc = _updater(idx, 8)
    seen, answers = {}, 0
    try:
        while proc.poll() is None:
            ix = Index(out)
            res = [r["name"] for r in ix.query_images([query], top_k=N)[0]["results"]]
            n = len(ix)
            assert n in (N, N - MOVED) and len(res) == n, (n, res)
            assert seen.setdefault(n, res) == res, (n, res, seen[n])  # one version's ranking, not a mix
            answers += 1
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert answers >= 20 and set(seen) == {N, N - MOVED}, (answers, sorted(seen))
    assert len(Index(out)) in (N, N - MOVED) and verify_index(out)["ok"]  # however the updater was stopped


def test_cli_queries_while_updates_replace_the_folder(idx):
    """`cbir query --json` x3 while a child removes / adds back / compacts the index -> each rc 0, 12 or 9 results

    Three query processes one after another, no error line from any."""
    out, gallery, _ = idx
    proc = _updater(idx, 60)
    counts = []
    try:
        for _ in range(3):
            p = subprocess.run([sys.executable, "-m", "cbir", "query", "--index", str(out), str(gallery / "im5.jpg"), "--json",
                                "--quiet", "--top-k", str(N)], env=ENV, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0 and not p.stderr.strip(), p.stderr[-2000:]
            counts.append(len(json.loads(p.stdout)["queries"][0]["results"]))
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    assert set(counts) <= {N, N - MOVED}, counts
