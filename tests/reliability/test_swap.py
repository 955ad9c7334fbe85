"""Issue 24.1: a process killed between the two renames of the folder swap (the old index moved aside, the new one not yet
in place) leaves no index at DIR; every open of DIR (CLI, service, the next update) puts one back by itself."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cbir.data import read_file_list
from cbir.engine import Index, add_images, build_index, verify_index
from cbir.errors import CbirError
from cbir.index import folder, manifest

REPO = Path(__file__).resolve().parents[2]

#: runs one update in a child process that SIGKILLs itself at the rename putting the new folder in place (the second
#: rename of commit_folder), as `strace -e inject=rename:signal=SIGKILL:when=5` does to `cbir index add`
KILLED_AT_SWAP = r"""
import os, signal, sys
from cbir.data import read_file_list
from cbir.engine import add_images, compact_index
real = os.replace
def replace(src, dst, *a, **k):
    if str(src).endswith(os.sep + "commit"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
what, folder, lst = sys.argv[1:4]
if what == "add":
    add_images(folder, read_file_list(lst), progress=False, workers=0)
else:
    compact_index(folder)
"""


def _killed(what, folder, lst=""):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", KILLED_AT_SWAP, what, str(folder), str(lst)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]


def _olds(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(folder.name + ".old-"))


@pytest.fixture
def half(small_set, tmp_path):
    """An index of 6 images whose `add` of 6 more was killed between the two renames: (folder, full list)."""
    entries = read_file_list(small_set / "list.txt")
    out = tmp_path / "idx"
    build_index(entries[:6], out, extractor="colour", progress=False, workers=0)
    _killed("add", out, small_set / "list.txt")
    # the state the issue found: nothing at DIR, the old index aside, the new one complete in DIR.partial/commit
    assert not out.exists() and len(_olds(out)) == 1
    assert (folder.partial_dir(out) / "commit" / manifest.MANIFEST).is_file()
    return out, small_set / "list.txt"


def test_opening_the_folder_puts_the_committed_index_back(half):
    out, _ = half
    idx = Index(out)
    assert len(idx) == 12  # the added images are there: the committed version, not the old one
    assert verify_index(out)["ok"] and _olds(out) == []  # the superseded old folder (cbir's own) is gone


def test_the_cli_verify_recovers_by_itself(half):
    out, _ = half
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-m", "cbir", "index", "verify", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "not a cbir index" not in p.stderr, p.stderr[-2000:]
    assert json.loads((out / manifest.MANIFEST).read_text())["count"] == 12


def test_the_next_update_recovers_then_runs(half):
    out, lst = half
    rep = add_images(out, read_file_list(lst), progress=False, workers=0)
    assert (rep.added, rep.count) == (0, 12) and verify_index(out)["ok"]


def test_a_build_into_the_folder_recovers_it_first(half):
    out, lst = half
    rep = build_index(read_file_list(lst), out, extractor="colour", progress=False, workers=0)
    assert rep.count == 12 and rep.reused == 12 and _olds(out) == []  # the recovered index's rows were reused


def test_a_damaged_commit_gives_back_the_old_index(half):
    out, _ = half
    commit = folder.partial_dir(out) / "commit"
    with open(commit / manifest.FEATURES, "r+b") as f:  # the new index is not whole: the old one comes back
        f.seek(100)
        f.write(b"\xff" * 64)
    assert len(Index(out)) == 6 and verify_index(out)["ok"]


def test_compact_killed_at_the_swap_is_recovered(small_set, tmp_path):
    out = tmp_path / "idx"
    build_index(read_file_list(small_set / "list.txt"), out, extractor="colour", progress=False, workers=0)
    _killed("compact", out)
    assert not out.exists()
    assert len(Index(out)) == 12 and verify_index(out)["ok"]


def test_a_live_update_holding_the_lock_is_waited_for_not_raced(half):
    """Between the renames of a running update the folder is missing for a moment: a reader must not move anything."""
    out, _ = half
    work = folder.partial_dir(out)
    with folder.BuildLock(work, out):
        with pytest.raises(CbirError, match="an update is replacing it"):
            folder.recover(out, wait_s=0)
        assert not out.exists() and len(_olds(out)) == 1  # untouched
    assert folder.recover(out) is not None and len(Index(out)) == 12


def test_the_service_starts_on_and_recovers_a_half_swapped_folder(half):
    pytest.importorskip("fastapi")
    from cbir.serve.state import IndexSlot

    out, _ = half
    slot = IndexSlot("t", out, warm=False)  # start-up opens the folder: recovered
    assert len(slot.get().index) == 12
    _killed("compact", out)  # now while it is served: the old version answers, the watcher's check puts the folder back
    assert not out.exists() and len(slot.get().index) == 12
    assert slot.check() is False and (out / manifest.MANIFEST).is_file()
    assert slot.check() is True and len(slot.get().index) == 12 and verify_index(out)["ok"]


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_the_issue_reproduction_with_strace(small_set, tmp_path):
    """`strace -e inject=rename:signal=SIGKILL:when=N cbir index add`, N the rename that puts the new folder in place
    (counted on a copy first: how many files an update writes depends on the index), then `cbir index verify`."""
    entries = read_file_list(small_set / "list.txt")
    out = tmp_path / "t"
    build_index(entries[:6], out, extractor="colour", progress=False, workers=0)
    shutil.copytree(out, tmp_path / "c")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def add(folder, *strace):
        cmd = ["strace", "-f", "-qq", *strace, "-e", "trace=rename", sys.executable, "-m", "cbir", "index", "add", "--index",
               str(folder), "--list", str(small_set / "list.txt"), "--quiet", "--workers", "0"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    add(tmp_path / "c", "-o", str(tmp_path / "trace"))
    renames = [ln for ln in (tmp_path / "trace").read_text().splitlines() if " rename(" in ln]
    n = next(i for i, ln in enumerate(renames, 1) if '/commit", ' in ln)
    p = add(out, "-o", os.devnull, "-e", f"inject=rename:signal=SIGKILL:when={n}")
    assert p.returncode in (137, -9) and not out.exists() and _olds(out), (p.returncode, p.stderr[-1000:])
    v = subprocess.run([sys.executable, "-m", "cbir", "index", "verify", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert v.returncode == 0, v.stderr[-2000:]
    assert json.loads((out / manifest.MANIFEST).read_text())["count"] == 12
