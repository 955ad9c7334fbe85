"""Issue 20.1: `kill -9` of an update at each moment of its work never loses the index: afterwards `index verify`
passes (the index put back by itself where the swap was cut), it holds the old version or the new one, and the same
update run again finishes it. The moment between the two renames of add and compact is in test_swap.py."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_textured

from cbir.cli import main
from cbir.engine import Index, verify_index

REPO = Path(__file__).resolve().parents[2]
N = 9  # images at build; the add brings 3 more, the remove takes 2 away

#: runs one update in a child that SIGKILLs itself at MOMENT (hooks on the index format's own functions)
KILLED = r"""
import os, signal, sys
from pathlib import Path
from cbir import sync, update
from cbir.data import read_file_list
from cbir.index import rows
what, moment, folder, arg = sys.argv[1:5]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)

def after(obj, name):
    real = getattr(obj, name)
    def hooked(*a, **k):
        out = real(*a, **k)
        die()
    setattr(obj, name, hooked)

if moment == "extract":  # the first batch of rows written to the work folder
    after(rows.RowSegments, "append")
elif moment == "features":  # features.h5 of the new version written
    after(update, "write_features")
elif moment == "manifest":  # the new version complete in FOLDER.partial/commit, not yet moved
    after(update, "write_manifest"); after(sync, "write_manifest")
else:
    real = os.replace
    def replace(src, dst, *a, **k):
        out = real(src, dst, *a, **k)
        if (moment == "aside" and ".old-" in str(dst)) or (moment == "after" and str(src).endswith(os.sep + "commit")):
            die()
        return out
    os.replace = replace
if what == "add":
    update.add_images(folder, read_file_list(arg), progress=False, workers=0)
elif what == "remove":
    update.remove_images(folder, arg.split(","))
elif what == "compact":
    update.compact_index(folder)
else:
    sync.sync_index(folder, progress=False, workers=0)
"""

CASES = [("add", m) for m in ("extract", "features", "manifest", "after")]
CASES += [("remove", m) for m in ("features", "manifest", "aside", "after")]
CASES += [("compact", m) for m in ("features", "manifest", "after")]
CASES += [("sync", m) for m in ("extract", "features", "manifest", "aside", "after")]


@pytest.fixture
def idx(tmp_path):
    gallery = tmp_path / "gallery"
    for i in range(N + 3):
        write_textured(gallery / f"c{i % 3}" / f"im{i}.jpg", 1100 + i)
    new = [gallery / f"c{i % 3}" / f"im{i}.jpg" for i in range(N, N + 3)]
    extra = tmp_path / "extra"
    extra.mkdir()
    for p in new:  # the build sees N images; the add and the sync bring the other 3
        os.replace(p, extra / p.name)
    assert main(["index", "build", str(gallery), "--labels", "folder", "--extractor", "colour", "--out", str(tmp_path / "idx"),
                 "--quiet", "--workers", "0"]) == 0
    (tmp_path / "add.txt").write_text("".join(f"{extra / p.name}\n" for p in new))
    return tmp_path / "idx", gallery, extra, new


def _olds(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name + ".old-"))


@pytest.mark.parametrize("what, moment", CASES, ids=[f"{w}-{m}" for w, m in CASES])
def test_kill_9_during_an_update(idx, capsys, what, moment):
    """kill -9 of `index add/remove/compact/sync` at MOMENT -> `index verify` rc 0 with the old or the new count; the
    same update run again gives the new count; no work or old folder left behind"""
    out, gallery, extra, new = idx
    arg = {"add": str(out.parent / "add.txt"), "remove": "c0/im0.jpg,c1/im1.jpg"}.get(what, "")
    if what == "sync":  # the folder changed: 3 images appeared, 2 were deleted
        for p in new:
            os.replace(extra / p.name, p)
        for n in ("c0/im0.jpg", "c1/im1.jpg"):
            os.unlink(gallery / n)
    old_n, new_n = N, {"add": N + 3, "remove": N - 2, "compact": N, "sync": N + 1}[what]
    p = subprocess.run([sys.executable, "-c", KILLED, what, moment, str(out), arg], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert main(["index", "verify", str(out)]) == 0, capsys.readouterr().err
    # a sync is a remove then an add, each atomic: killed between them it holds the folder without the deleted files
    assert len(Index(out)) in ((old_n, new_n, N - 2) if what == "sync" else (old_n, new_n))
    again = {"add": ["index", "add", "--index", str(out), "--list", arg, "--quiet", "--workers", "0"],
             "remove": ["index", "remove", "--index", str(out), *arg.split(",")],
             "compact": ["index", "compact", str(out)],
             "sync": ["index", "sync", str(out), "--quiet", "--workers", "0"]}[what]
    rc = main(again)
    err = capsys.readouterr().err
    # a remove whose swap had landed finds nothing left to remove: its one-line error says so, the count is right
    assert rc == 0 or (what == "remove" and "none of the 2 name(s) is in the index" in err), err
    assert len(Index(out)) == new_n and verify_index(out)["ok"]
    assert _olds(out) == [] and not (out.parent / (out.name + ".partial")).exists()
