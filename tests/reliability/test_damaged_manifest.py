"""Issue 20.2: a manifest claiming absurd counts, dimensions, search parameters, graph sizes or ids, with its own
checksum and extractor key recomputed (as a hostile writer could), cannot make `index verify`, `index info`, `query`,
`eval` or `index add` allocate more than the real files justify: each answers with one line naming the file, or
correctly; the peak memory of the process stays within the intact index's peak plus twice the index's bytes."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_textured

from cbir.cli import main
from cbir.index import manifest as mf

REPO = Path(__file__).resolve().parents[2]
#: what allocators and imports vary between two runs of the same commands (measured: within 21 MB of each other)
NOISE_MB = 32

#: the commands, one after another in one process; prints [name, rc, peak MB, stderr lines] after each
CHILD = r"""
import contextlib, io, json, resource, sys
from cbir.cli import main
folder, img, lst = sys.argv[1:4]
for name, args in (("verify", ["index", "verify", folder]), ("info", ["index", "info", folder]),
                   ("query", ["query", "--index", folder, img, "--quiet"]), ("eval", ["eval", "--index", folder, "--quiet"]),
                   ("add", ["index", "add", "--index", folder, "--list", lst, "--quiet", "--workers", "0"])):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(args)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    print(json.dumps([name, rc, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, lines]), flush=True)
"""

#: edit -> (the file each command must name, or None where the commands answer as on the intact index)
EDITS = {
    "count 10^12": (lambda m: m.__setitem__("count", 10**12), "features.h5"),
    "dim 2^20": (lambda m: m.__setitem__("dim", 2**20), "features.h5"),
    "search nlist/nprobe/ef 2^24": (lambda m: m["search"].update(nlist=2**24, nprobe=2**24, ef=2**24), None),
    "graph k 10^9": (lambda m: m.__setitem__("graph", {"qe_k": 10**9, "dba_k": 10**9, "alpha": 3.0}), "manifest.json"),
    "knn k 10^9": (lambda m: m.__setitem__("knn", {"file": "knn.h5", "k": 10**9}), "manifest.json"),
    "next_id 10^30": (lambda m: m.__setitem__("next_id", 10**30), "manifest.json"),
    "features.h5 of 2^60 bytes": (lambda m: m["files"]["features.h5"].__setitem__("bytes", 2**60), "features.h5"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("absurd")
    for i in range(9):
        write_textured(root / "gallery" / f"c{i % 3}" / f"im{i}.jpg", 1500 + i)
    write_textured(root / "new.jpg", 1599)
    (root / "add.txt").write_text(f"{root / 'new.jpg'}\n")
    assert main(["index", "build", str(root / "gallery"), "--labels", "folder", "--extractor", "colour", "--out",
                 str(root / "idx"), "--quiet", "--workers", "0"]) == 0
    return root


def _run(built, folder):
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(built / "gallery" / "c1" / "im4.jpg"), str(built / "add.txt")],
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    out = {}
    for ln in p.stdout.splitlines():
        name, rc, peak, lines = json.loads(ln)
        out[name] = (rc, peak, lines)
    return out


@pytest.fixture(scope="module")
def intact(built, tmp_path_factory):
    folder = tmp_path_factory.mktemp("intact") / "idx"
    shutil.copytree(built / "idx", folder)
    return _run(built, folder)


def _edit(folder, fn):
    p = folder / mf.MANIFEST
    m = json.loads(p.read_text())
    fn(m)
    ident = {k: v for k, v in m["extractor"].items() if k not in ("key", "key_nostate", "state")}
    m["extractor"]["key_nostate"] = mf.canonical_sha256(ident)[:16]
    m[mf.MANIFEST_SUM] = mf.manifest_digest(m)
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_absurd_manifest(built, intact, tmp_path, edit):
    """manifest claiming EDIT (checksums recomputed) -> verify / info / query / eval / add: one line naming the file, rc 2
    (or the intact answer, rc 0); peak memory within the intact peak + 2 x the index's bytes + 32 MB"""
    fn, named = EDITS[edit]
    folder = tmp_path / "idx"
    shutil.copytree(built / "idx", folder)
    _edit(folder, fn)
    budget = max(peak for _, peak, _ in intact.values()) + 2 * sum(p.stat().st_size for p in folder.iterdir()) // 2**20 + NOISE_MB
    got = _run(built, folder)
    assert set(got) == {"verify", "info", "query", "eval", "add"}, got
    for cmd, (rc, peak, err) in got.items():
        assert peak <= budget, (cmd, peak, budget)
        if named is None:
            assert rc == intact[cmd][0] == 0, (cmd, rc, err)
        else:
            assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and str(folder / named) in err[0], (cmd, rc, err)
