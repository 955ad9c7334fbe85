"""Issue 20.1: `index add/remove/compact/sync` given bad lists: each case is a clear one-line error (rc 2, the index
byte-for-byte as it was) or a reported skip (rc 0, the rest applied); never a half-applied change."""

import os
import shutil
from pathlib import Path

import pytest

from helpers import write_textured

from cbir.cli import main
from cbir.engine import Index, verify_index

NAMES = [f"class{c}/im{v}.jpg" for c in range(3) for v in range(3)]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A 9-image folder (3 classes), written once."""
    root = tmp_path_factory.mktemp("lists")
    for i, n in enumerate(NAMES):
        write_textured(root / n, 300 + i)
    return root


@pytest.fixture
def case(gallery, tmp_path, capsys):
    """(index of a copy of the folder, that copy, a scratch folder of bad files) for one case (a build: 0.3 s)."""
    shutil.copytree(gallery, tmp_path / "gallery")
    assert main(["index", "build", str(tmp_path / "gallery"), "--labels", "folder", "--extractor", "colour", "--out",
                 str(tmp_path / "idx"), "--quiet", "--workers", "0"]) == 0
    s = tmp_path / "scratch"
    s.mkdir()
    (s / "zero.jpg").write_bytes(b"")
    (s / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2)
    good = (tmp_path / "gallery" / NAMES[0]).read_bytes()
    (s / "cut.jpg").write_bytes(good[: len(good) // 3])
    (s / "folder.jpg").mkdir()
    write_textured(s / "new1.jpg", 901)
    write_textured(s / "new2.jpg", 902)
    capsys.readouterr()
    return tmp_path / "idx", tmp_path / "gallery", s


def _snap(folder: Path):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _list(path: Path, lines):
    path.write_text("".join(f"{x}\n" for x in lines))
    return str(path)


def _run(capsys, *args):
    rc = main([*args])
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.err.splitlines() if ln.strip()], cap.out


def _one_line_error(rc, err, *words):
    """rc 2 and exactly one `error:` line holding ``words``; any other line is a per-image `skipped` report."""
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert rc == 2 and len(errors) == 1, (rc, err)
    assert all(w in errors[0] for w in words), (words, errors[0])
    assert all(ln.startswith(("error: ", "skipped ")) for ln in err), err


def _add(idx, lst):
    return ("index", "add", "--index", str(idx), "--list", lst, "--quiet", "--workers", "0")


# ----------------------------------------------------------------------------- add


def test_add_of_a_missing_file(case, capsys):
    """`index add` of a list naming only a file that does not exist -> one error line naming it, rc 2, index unchanged"""
    idx, _, s = case
    before = _snap(idx)
    _one_line_error(*_run(capsys, *_add(idx, _list(s / "l.txt", [s / "nope.jpg"])))[:2], str(s / "nope.jpg"), "file not found",
                    "nothing added")
    assert _snap(idx) == before


def test_add_of_a_missing_file_among_new_ones(case, capsys):
    """`index add`: a missing file among two new images -> the two added, the missing one reported as skipped, rc 0"""
    idx, _, s = case
    rc, err, out = _run(capsys, *_add(idx, _list(s / "l.txt", [s / "new1.jpg", s / "nope.jpg", s / "new2.jpg"])))
    assert rc == 0 and "2 added" in out and "1 unreadable" in out and f"skipped {s / 'nope.jpg'}: file not found" in out
    assert len(Index(idx)) == len(NAMES) + 2 and verify_index(idx)["ok"]


def test_add_of_a_folder_named_as_an_image(case, capsys):
    """`index add` of a list naming a folder (`folder.jpg/`) -> one error line naming it ("is a folder"), rc 2, unchanged"""
    idx, _, s = case
    before = _snap(idx)
    _one_line_error(*_run(capsys, *_add(idx, _list(s / "l.txt", [s / "folder.jpg"])))[:2], str(s / "folder.jpg"), "is a folder")
    assert _snap(idx) == before


def test_add_of_images_already_indexed(case, capsys):
    """`index add` of images already in the index (same names, and the same files under other spellings) -> 0 added,
    all reported as already there, rc 0, the index byte-for-byte unchanged"""
    idx, gal, _ = case
    before = _snap(idx)
    lst = _list(gal.parent / "l.txt", [f"{n}\tclass9" for n in NAMES[:3]] + [gal / "." / NAMES[4], f"{gal}//{NAMES[5]}"])
    rc, err, out = _run(capsys, "index", "add", "--index", str(idx), "--list", lst, "--root", str(gal), "--quiet")
    assert rc == 0 and "0 added, 5 already there" in out, (out, err)
    assert _snap(idx) == before


def test_add_of_an_empty_list(case, capsys):
    """`index add --list EMPTY` -> one line "the list holds no image", rc 2, index unchanged"""
    idx, _, s = case
    before = _snap(idx)
    lst = _list(s / "empty.txt", [])
    _one_line_error(*_run(capsys, *_add(idx, lst))[:2], lst, "holds no image")
    assert _snap(idx) == before


@pytest.mark.parametrize("bad, cause", [("zero.jpg", "empty file (0 bytes)"), ("corrupt.jpg", ""), ("cut.jpg", "")])
def test_add_of_an_unreadable_image(case, capsys, bad, cause):
    """`index add` of only a 0-byte, a corrupt or a truncated JPEG -> one error line naming it, rc 2, index unchanged"""
    idx, _, s = case
    before = _snap(idx)
    _one_line_error(*_run(capsys, *_add(idx, _list(s / "l.txt", [s / bad])))[:2], str(s / bad), cause, "nothing added")
    assert _snap(idx) == before


def test_add_of_unreadable_images_among_new_ones(case, capsys):
    """`index add` of a 0-byte and a corrupt image among two new ones -> the two added, the bad ones reported, rc 0"""
    idx, _, s = case
    rc, err, out = _run(capsys, *_add(idx, _list(s / "l.txt", [s / "zero.jpg", s / "new1.jpg", s / "corrupt.jpg", s / "new2.jpg"])))
    assert rc == 0 and "2 added" in out and "2 unreadable" in out, (out, err)
    idx_ = Index(idx)
    assert len(idx_) == len(NAMES) + 2 and {"new1.jpg", "new2.jpg"} <= set(idx_.names) and verify_index(idx)["ok"]


def test_strict_add_with_one_bad_image_adds_nothing(case, capsys):
    """`index add --strict` of good images then a corrupt one -> one error line naming it, rc 2, nothing added"""
    idx, _, s = case
    before = _snap(idx)
    rc, err, _ = _run(capsys, *_add(idx, _list(s / "l.txt", [s / "new1.jpg", s / "new2.jpg", s / "corrupt.jpg"])), "--strict")
    _one_line_error(rc, err, "--strict", str(s / "corrupt.jpg"), "nothing added")
    assert _snap(idx) == before


def test_add_into_a_folder_that_is_not_an_index(case, capsys):
    """`index add --index NOT_AN_INDEX` -> one line "not a cbir index", rc 2, nothing written there"""
    _, _, s = case
    _one_line_error(*_run(capsys, *_add(s / "folder.jpg", _list(s / "l.txt", [s / "new1.jpg"])))[:2], "not a cbir index")
    assert list((s / "folder.jpg").iterdir()) == [] and not (s / "folder.jpg.partial").exists()


# ----------------------------------------------------------------------------- remove


def test_remove_of_names_not_in_the_index(case, capsys):
    """`index remove` of names not in the index -> one line naming the index and an example name, rc 2, unchanged"""
    idx, _, _ = case
    before = _snap(idx)
    _one_line_error(*_run(capsys, "index", "remove", "--index", str(idx), "nope.jpg", "class0/nope.jpg")[:2],
                    "none of the 2 name(s) is in the index", NAMES[0])
    assert _snap(idx) == before


def test_remove_of_unknown_names_among_known_ones(case, capsys):
    """`index remove` of one unknown name and one indexed -> the indexed one removed, the other reported not found, rc 0"""
    idx, _, _ = case
    rc, err, out = _run(capsys, "index", "remove", "--index", str(idx), "nope.jpg", NAMES[1], NAMES[1])
    assert rc == 0 and "1 removed, 1 not found" in out and err == ["note: 1 name(s) not in the index, e.g. nope.jpg"], (out, err)
    assert NAMES[1] not in set(Index(idx).names) and len(Index(idx)) == len(NAMES) - 1 and verify_index(idx)["ok"]


@pytest.mark.parametrize("how", ["empty list", "no names"])
def test_remove_of_nothing(case, capsys, how):
    """`index remove` with an empty --list, or no name at all -> one error line, rc 2, index unchanged"""
    idx, _, s = case
    before = _snap(idx)
    extra = ["--list", _list(s / "empty.txt", [])] if how == "empty list" else []
    _one_line_error(*_run(capsys, "index", "remove", "--index", str(idx), *extra)[:2], "" if extra else "name the images to remove")
    assert _snap(idx) == before


def test_remove_of_every_image_leaves_an_empty_index_that_answers(case, capsys):
    """`index remove` of every image -> an index of 0 images that verifies and answers a query with no result; `add`
    puts images back under new ids"""
    idx, gal, s = case
    rc, err, out = _run(capsys, "index", "remove", "--index", str(idx), *NAMES)
    assert rc == 0 and f"{len(NAMES)} removed" in out, (out, err)
    assert len(Index(idx)) == 0 and verify_index(idx)["ok"]
    rc, err, out = _run(capsys, "query", "--index", str(idx), str(s / "new1.jpg"), "--json", "--quiet")
    assert rc == 0 and '"results": []' in out, (out, err)
    rc, err, out = _run(capsys, *_add(idx, _list(s / "l.txt", [s / "new1.jpg"])))
    back = Index(idx)
    assert rc == 0 and len(back) == 1 and int(back.ids[0]) >= len(NAMES) and verify_index(idx)["ok"], (out, err)


# ----------------------------------------------------------------------------- compact and sync


def test_compact_of_a_folder_that_is_not_an_index(case, capsys):
    """`index compact NOT_AN_INDEX` -> one line "not a cbir index", rc 2"""
    _, _, s = case
    _one_line_error(*_run(capsys, "index", "compact", str(s / "folder.jpg"))[:2], str(s / "folder.jpg"), "not a cbir index")


@pytest.mark.parametrize("what", ["missing", "a file"])
def test_sync_with_a_folder_that_is_not_one(case, capsys, what):
    """`index sync INDEX PATH` where PATH is missing or a file -> one line naming it, rc 2, index unchanged"""
    idx, _, s = case
    before = _snap(idx)
    path = s / "nofolder" if what == "missing" else s / "zero.jpg"
    _one_line_error(*_run(capsys, "index", "sync", str(idx), str(path), "--quiet")[:2], str(path), "not a folder")
    assert _snap(idx) == before


def test_sync_with_an_empty_folder_removes_nothing(case, capsys):
    """`index sync INDEX EMPTY_FOLDER` (an unmounted drive) -> one line "holds no images ... nothing was changed", rc 2,
    every image kept (it removed them all before)"""
    idx, _, s = case
    before = _snap(idx)
    _one_line_error(*_run(capsys, "index", "sync", str(idx), str(s / "folder.jpg"), "--quiet")[:2], "holds no images",
                    "nothing was changed")
    assert _snap(idx) == before


@pytest.mark.parametrize("bad", ["zero.jpg", "corrupt.jpg"])
def test_sync_with_an_unreadable_new_image(case, capsys, bad):
    """`index sync` of a folder with a new good image and a new 0-byte / corrupt one -> the good one added, the bad one
    listed as failed, rc 0; the index verifies"""
    idx, gal, s = case
    shutil.copy(s / "new1.jpg", gal / "class0" / "new1.jpg")
    shutil.copy(s / bad, gal / "class1" / bad)
    rc, err, out = _run(capsys, "index", "sync", str(idx), "--quiet", "--workers", "0")
    assert rc == 0 and "1 added" in out and "1 failed" in out and f"failed   class1/{bad}" in out, (out, err)
    got = Index(idx)
    assert "class0/new1.jpg" in set(got.names) and f"class1/{bad}" not in set(got.names) and verify_index(idx)["ok"]
    rc, _, out = _run(capsys, "index", "sync", str(idx), "--quiet", "--workers", "0", "--dry-run")
    # the good image is not added twice; the bad one is tried again (it may have been fixed meanwhile)
    assert rc == 0 and "1 added, 0 changed, 0 removed" in out and f"added    class1/{bad}" in out, out
    assert os.path.exists(gal / "class1" / bad)  # the folder is only read
