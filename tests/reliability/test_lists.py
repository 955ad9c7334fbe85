"""Issue 24.5: a list that is not UTF-8, or an image passed as --list, is one line `error: FILE: cause`, rc 2 (build,
add, remove), never a traceback."""

import pytest

from cbir.cli import main
from cbir.data import read_file_list
from cbir.engine import build_index
from cbir.errors import CbirError


@pytest.fixture
def idx(small_set, tmp_path):
    build_index(read_file_list(small_set / "list.txt")[:4], tmp_path / "idx", extractor="colour", progress=False, workers=0)
    return tmp_path / "idx"


def _bad_lists(small_set, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"img/a.jpg\tcaf\xe9\n")
    return {"latin-1": (latin1, "not UTF-8 text (byte 0xe9 on line 1)"),
            "jpeg": (small_set / "img" / "g0_0.jpg", "is a JPEG image, not a file list")}


@pytest.mark.parametrize("kind", ["latin-1", "jpeg"])
@pytest.mark.parametrize("command", ["build", "add", "remove"])
def test_a_bad_list_is_one_line_rc_2(small_set, tmp_path, idx, capsys, kind, command):
    lst, cause = _bad_lists(small_set, tmp_path)[kind]
    args = {"build": ["index", "build", "--list", str(lst), "--extractor", "colour", "--out", str(tmp_path / "new")],
            "add": ["index", "add", "--index", str(idx), "--list", str(lst)],
            "remove": ["index", "remove", "--index", str(idx), "--list", str(lst)]}[command]
    assert main([*args, "--quiet"] if command != "remove" else args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {lst}: {cause}"), err


def test_the_library_raises_the_same_one_line_error(small_set, tmp_path):
    for lst, cause in _bad_lists(small_set, tmp_path).values():
        with pytest.raises(CbirError, match=f"{lst}: "):
            read_file_list(lst)
