"""The index folder as a safe container: --out never destroys what cbir did not write, one build at a time,
checksummed files, a validated manifest, disk-full and read-only targets as one-line errors, kill -9 resumes."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers import REPO
from cbir.data import read_file_list
from cbir.engine import Index, build_index, verify_index
from cbir.errors import CbirError, IndexDamaged
from cbir.index import atomic, folder, manifest, rows, verify

COLOUR = dict(extractor="colour", progress=False)
HASH = dict(extractor="hash", conf={"base": "colour", "base_conf": {}}, progress=False)  # has learned state (extractor.h5)


def _cli(args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "cbir", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for w in words:
        assert w in last, (w, last)
    return last


# ----------------------------------------------------------------------------- --out guard


def test_out_refuses_a_folder_with_other_files_and_keeps_them(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.jpg").write_bytes(b"not an index")
    (victim / "thesis.txt").write_text("years of work")
    with pytest.raises(CbirError, match="not a cbir index"):
        build_index(entries, victim, **COLOUR)
    assert sorted(p.name for p in victim.iterdir()) == ["precious.jpg", "thesis.txt"]
    assert not folder.partial_dir(victim).exists()  # refused before any work


def test_out_refuses_the_gallery_the_working_folder_its_parents_a_file_and_dot(small_set, tmp_path, monkeypatch):
    entries = read_file_list(small_set / "list.txt")
    images = sorted((small_set / "img").iterdir())
    with pytest.raises(CbirError, match="listed image"):
        build_index(entries, small_set / "img", **COLOUR)
    with pytest.raises(CbirError, match="listed image"):  # a parent of the images
        build_index(entries, small_set, **COLOUR)
    with pytest.raises(CbirError, match="gallery's root"):
        build_index(entries[:1], tmp_path / "elsewhere" / "..", roots=[tmp_path / "r"], **COLOUR)
    work = tmp_path / "cwd" / "sub"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    for out in (".", "..", str(work), str(tmp_path / "cwd")):
        with pytest.raises(CbirError, match="working folder"):
            build_index(entries, out, **COLOUR)
    f = tmp_path / "afile.txt"
    f.write_text("keep")
    with pytest.raises(CbirError, match="not a folder"):
        build_index(entries, f, **COLOUR)
    assert f.read_text() == "keep"
    assert sorted((small_set / "img").iterdir()) == images


def test_out_accepts_new_empty_and_index_folders_and_refuses_foreign_files_in_an_index(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    (tmp_path / "empty").mkdir()
    assert build_index(entries, tmp_path / "empty", **COLOUR).count == 12
    assert build_index(entries, tmp_path / "empty", **COLOUR).reused == 12  # an index is replaced by its rebuild
    (tmp_path / "empty" / "notes.txt").write_text("mine")
    with pytest.raises(CbirError, match="notes.txt"):
        build_index(entries, tmp_path / "empty", **COLOUR)
    assert (tmp_path / "empty" / "notes.txt").read_text() == "mine"


def test_a_work_folder_not_made_by_cbir_is_never_cleared(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    other = tmp_path / "idx.partial"
    other.mkdir()
    (other / "data.bin").write_bytes(b"x")
    with pytest.raises(CbirError, match="not made by cbir"):
        build_index(entries, tmp_path / "idx", **COLOUR)
    assert (other / "data.bin").read_bytes() == b"x"


def test_cli_out_guard_is_one_line(small_set, tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep")
    p = _cli(["index", "build", "--list", str(small_set / "list.txt"), "--extractor", "colour", "--out", str(victim), "--quiet"])
    _one_line_error(p, "victim", "precious.txt")
    p = _cli(["index", "build", "--list", str(small_set / "list.txt"), "--extractor", "colour", "--out", ".", "--quiet"], cwd=tmp_path)
    _one_line_error(p, "working folder")
    assert (victim / "precious.txt").read_text() == "keep"


# ----------------------------------------------------------------------------- one build at a time, kill -9


def test_a_second_build_into_the_same_out_stops_naming_the_first(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    out = tmp_path / "idx"
    work = folder.partial_dir(out)
    work.mkdir()
    with folder.BuildLock(work, out):  # what a running build holds (flock: per open file, so this process conflicts too)
        with pytest.raises(CbirError, match=rf"another build or update \(pid {os.getpid()}\) is writing"):
            build_index(entries, out, **COLOUR)
    assert build_index(entries, out, **COLOUR).count == 12  # released: the next build runs


HELD_BUILD = textwrap.dedent("""
    import os, sys, time
    from cbir.extractors.colour import ColourExtractor
    real, calls = ColourExtractor.extract, []
    def extract(self, images):  # after two batches, hold the build (lock taken, rows written) until killed
        calls.append(1)
        t0 = time.time()
        while len(calls) > 2 and time.time() - t0 < 120:
            time.sleep(0.05)
        return real(self, images)
    ColourExtractor.extract = extract
    from cbir.cli import main
    sys.exit(main(["index", "build", "--list", sys.argv[1], "--extractor", "colour", "--out", sys.argv[2], "--batch-size", "2", "--quiet"]))
""")


def test_kill_9_mid_build_then_the_same_build_resumes_and_a_concurrent_one_is_refused(small_set, tmp_path):
    out = tmp_path / "idx"
    script = tmp_path / "slow.py"
    script.write_text(HELD_BUILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(small_set / "list.txt"), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rows = folder.partial_dir(out) / "rows"
    t0 = time.time()
    try:
        while len(list(rows.glob("part-*.h5"))) < 2 and time.time() - t0 < 120 and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        second = _cli(["index", "build", "--list", str(small_set / "list.txt"), "--extractor", "colour", "--out", str(out), "--quiet"])
        _one_line_error(second, "another build or update (pid", str(out))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert not (out / manifest.MANIFEST).exists()
    rep = build_index(read_file_list(small_set / "list.txt"), out, **COLOUR)  # the lock died with the process
    assert rep.reused >= 4 and rep.count == 12 and verify_index(out)["ok"]


# ----------------------------------------------------------------------------- disk full, read-only


class _FailingRaw:
    """A file that takes ``room`` bytes, then fails every write with ``code`` (ENOSPC, EROFS...)."""

    def __init__(self, raw, room: int, code: int):
        self.raw, self.room, self.code = raw, room, code

    def write(self, b):
        if self.room <= 0:
            raise OSError(self.code, os.strerror(self.code))
        n = min(len(b), self.room)
        self.room -= n
        return self.raw.write(bytes(b[:n]))

    def __getattr__(self, name):
        return getattr(self.raw, name)


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left on device"), (errno.EROFS, "read-only file system")])
def test_a_write_error_is_one_line_keeps_the_old_index_and_the_work(small_set, tmp_path, monkeypatch, code, words):
    entries = read_file_list(small_set / "list.txt")
    out = tmp_path / "idx"
    build_index(entries[:6], out, **COLOUR)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_init = atomic.SafeFile.__init__
    budget = {"features.h5.tmp": 2000}  # the final features file fails after 2 kB; row segments write normally

    def init(self, raw, *args, **kwargs):
        real_init(self, raw, *args, **kwargs)
        room = budget.get(os.path.basename(raw.name))
        if room is not None:
            self.raw = _FailingRaw(raw, room, code)

    monkeypatch.setattr(atomic.SafeFile, "__init__", init)
    with pytest.raises(atomic.WriteError, match=words) as e:
        build_index(entries, out, **COLOUR)
    assert "features.h5" in str(e.value) and "run the same command again to resume" in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous index intact
    assert not (folder.partial_dir(out) / "commit").exists() and not list(folder.partial_dir(out).rglob("*.tmp"))
    monkeypatch.setattr(atomic.SafeFile, "__init__", real_init)
    rep = build_index(entries, out, **COLOUR)
    assert rep.count == 12 and rep.extracted == 0  # every row was kept for the resumed build


def test_not_enough_space_is_said_before_extracting(small_set, tmp_path, monkeypatch):
    import shutil as sh

    entries = read_file_list(small_set / "list.txt")
    monkeypatch.setattr(sh, "disk_usage", lambda p: sh._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    with pytest.raises(atomic.WriteError, match=r"not enough space for 12 images: about .* MB needed, 0\.0 MB free"):
        build_index(entries, tmp_path / "idx", **COLOUR)


def _mount_tmpfs(path, size):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")


@pytest.mark.parametrize("bypass_precheck", [False, True])
def test_build_into_a_full_tmpfs_is_a_one_line_error_not_a_crash(small_set, tmp_path, bypass_precheck):
    """A real ENOSPC from the kernel (HDF5 crashed the interpreter with signal 11 on it before), with and without the
    free-space check that normally stops the build before it starts writing."""
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "64k")
    try:
        args = ["index", "build", "--list", str(small_set / "list.txt"), "--extractor", "colour", "--out", str(mnt / "idx"), "--quiet"]
        if bypass_precheck:
            code = ("import sys; import cbir.build as s; s.check_space = lambda *a, **k: None; from cbir.cli import main; "
                    "sys.exit(main(sys.argv[1:]))")
            p = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "PYTHONPATH": str(REPO)},
                               capture_output=True, text=True, timeout=300)
        else:
            p = _cli(args)
        _one_line_error(p, "space")
        assert not (mnt / "idx").exists()
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ----------------------------------------------------------------------------- damaged files


@pytest.fixture()
def built(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **HASH)
    return tmp_path / "idx"


def _zero_middle(p):
    """4000 bytes near the end overwritten (as the issue's check does, but inverted: HDF5 files hold zero padding,
    where writing zeros would change nothing)."""
    b = bytearray(p.read_bytes())
    n = len(b)
    k = min(4000, n // 4)
    b[n - 2 * k : n - k] = bytes(x ^ 0xFF for x in b[n - 2 * k : n - k])
    p.write_bytes(bytes(b))


DAMAGE = {
    "zeroed": _zero_middle,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
    "random": lambda p: p.write_bytes(np.random.default_rng(0).integers(0, 256, p.stat().st_size, dtype=np.uint8).tobytes()),
    "missing": lambda p: p.unlink(),
}


@pytest.mark.parametrize("name", ["hamming.faiss", "features.h5", "extractor.h5"])
@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damage_to_any_file_is_named(built, name, how):
    DAMAGE[how](built / name)
    with pytest.raises(IndexDamaged, match=rf"{name}: damaged \(.*\) — rebuild with `cbir index build --list .* --out {built}`"):
        Index(built).extractor  # noqa: B018 - extractor.h5 is read when the extractor is built
    rep = verify_index(built)
    assert not rep["ok"] and name in rep["errors"][0]


def test_damage_found_without_checksums_is_still_one_line(built):
    """An index whose manifest has no checksums (an older cbir): h5py/faiss read errors still name the file."""
    m = json.loads((built / manifest.MANIFEST).read_text())
    del m["files"], m[manifest.MANIFEST_SUM]  # an older cbir recorded neither
    (built / manifest.MANIFEST).write_text(json.dumps(m))
    DAMAGE["random"](built / "hamming.faiss")
    with pytest.raises(IndexDamaged, match="hamming.faiss: damaged"):
        Index(built)


def test_cli_query_of_a_zeroed_faiss_file_fails_with_one_line(built, small_set):
    _zero_middle(built / "hamming.faiss")
    p = _cli(["query", "--index", str(built), str(small_set / "img" / "g0_0.jpg")])
    _one_line_error(p, "hamming.faiss: damaged (checksum mismatch")
    p = _cli(["index", "verify", str(built)])
    _one_line_error(p, "hamming.faiss")
    assert "DAMAGED" in p.stdout


def test_verify_passes_on_a_good_index(built):
    rep = verify_index(built)
    assert rep["ok"] and {f["file"] for f in rep["files"]} == {"features.h5", "hamming.faiss", "extractor.h5"}


# ----------------------------------------------------------------------------- hostile manifests


def _edit(folder, fn):
    p = folder / manifest.MANIFEST
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


HOSTILE = {
    "faiss outside the folder": (lambda m: m.__setitem__("faiss", "../../../etc/passwd"), "'faiss'"),
    "extractor not an object": (lambda m: m.__setitem__("extractor", [1, 2]), "'extractor' must be"),
    "dim unbounded": (lambda m: m.__setitem__("dim", 10**12), "'dim'"),
    "dim a string": (lambda m: m.__setitem__("dim", "256"), "'dim'"),
    "count negative": (lambda m: m.__setitem__("count", -1), "'count'"),
    "metric unknown": (lambda m: m.__setitem__("metric", "l1"), "'metric'"),
    "file name escapes": (lambda m: m["files"].__setitem__("../x.h5", {"bytes": 1, "sha256": "0" * 64}), "not a plain name"),
    "bundled file escapes": (lambda m: m["extractor"]["conf"].__setitem__("../../x", "@../../x"), "bundled file"),
    "bundled file renamed": (lambda m: m["extractor"]["conf"].__setitem__("head", "@other"), "bundled file"),
    "not an object": (lambda m: m.clear(), "format version"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_manifest_is_refused_before_anything_is_opened(built, case):
    fn, words = HOSTILE[case]
    _edit(built, fn)
    with pytest.raises(CbirError, match=words):
        Index(built)


def test_a_conf_that_implies_another_dimension_is_refused_before_allocating(small_set, tmp_path):
    """bins [1000,1000,1000] made one query take 81 s and 15.9 GB: the implied 10^9-d is compared with dim first."""
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **COLOUR)

    def edit(m):  # and the manifest's own checks recomputed, as a hostile writer could: the dimension check still holds
        m["extractor"]["conf"]["bins"] = [1000, 1000, 1000]
        ident = {k: v for k, v in m["extractor"].items() if k not in ("key", "key_nostate", "state")}
        m["extractor"]["key_nostate"] = manifest.canonical_sha256(ident)[:16]
        m[manifest.MANIFEST_SUM] = manifest.manifest_digest(m)

    _edit(tmp_path / "idx", edit)
    idx = Index(tmp_path / "idx")
    with pytest.raises(IndexDamaged, match="implies 1000000000-d descriptors, the index holds 256-d"):
        idx.query_images([entries[0].path])


# ----------------------------------------------------------------------------- writers


def test_files_are_written_atomically_and_checksums_match(built):
    m = json.loads((built / manifest.MANIFEST).read_text())
    for name, rec in m["files"].items():
        assert rec == verify.file_record(built / name)
    assert not list(built.glob("*.tmp"))


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        atomic.write_json_atomic({"map": float("nan")}, tmp_path / "r.json")
    assert not list(tmp_path.iterdir())


def test_opening_an_index_reads_no_vector_until_one_is_used(small_set, tmp_path):
    """Names and labels load on open; descriptors are read on use, only the rows asked for, from the file as opened."""
    entries = read_file_list(small_set / "list.txt")[:6]
    build_index(entries, tmp_path / "idx", **COLOUR)
    idx = Index(tmp_path / "idx")
    lazy = idx._descriptors
    assert isinstance(lazy, rows.LazyRows) and lazy._all is None
    full = np.asarray(rows.read_rows(tmp_path / "idx" / manifest.FEATURES)[0]["descriptors"])
    np.testing.assert_array_equal(idx.descriptor_rows([3, 1, 3]), full[[3, 1, 3]])
    np.testing.assert_array_equal(idx.query_vectors(np.array([5])), full[[5]])
    np.testing.assert_array_equal(lazy[-1], full[-1])
    np.testing.assert_array_equal(lazy[np.array([False, True, False, False, False, True])], full[[1, 5]])
    assert lazy[np.zeros(0, int)].shape == (0, full.shape[1]) and lazy._all is None
    # a rebuild replaces the folder: the opened index still reads what it opened
    build_index(entries[:3], tmp_path / "idx", **COLOUR)
    np.testing.assert_array_equal(np.asarray(idx.descriptors), full)
    assert len(Index(tmp_path / "idx").descriptors) == 3
