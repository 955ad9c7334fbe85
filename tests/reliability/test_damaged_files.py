"""Issue 20.2: each file of an index folder flipped, truncated, emptied, replaced with junk or deleted, in turn; `index
verify`, `query`, `index info` and `eval` each answer with one line naming the file (rc 2, no traceback), or, when the
command does not read that file and its size still matches, with exactly the intact index's answer (never a silently
wrong one). Also: a file replaced by a symbolic link is refused by every command.

The indexes are built once per module (a --local colour index of a folder, synced once so it holds content.h5, and a
hash index with learned state); each case damages its own copy.
"""

import json
import shutil
from pathlib import Path

import pytest

from helpers import write_textured

from cbir.cli import main

#: the files each index holds (checked: a file a build starts writing is added to the matrix, not left out of it)
FILES = {"local": ["content.h5", "cosine.faiss", "features.h5", "knn.h5", "local.h5", "manifest.json"],
         "hash": ["extractor.h5", "features.h5", "hamming.faiss", "manifest.json"]}
#: the files each command reads (and checks byte by byte); it checks every other file's presence and size only
READS = {"verify": "*", "info": {"manifest.json"},
         "query": {"manifest.json", "features.h5", "cosine.faiss", "hamming.faiss", "knn.h5", "extractor.h5"},
         "rerank": {"manifest.json", "features.h5", "cosine.faiss", "knn.h5", "local.h5"},
         "eval": {"manifest.json", "features.h5", "cosine.faiss", "hamming.faiss", "knn.h5"}}
DAMAGES = ("flip", "truncate", "empty", "junk", "delete")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    for c in range(3):
        for v in range(4):
            write_textured(root / "gallery" / f"class{c}" / f"im{v}.jpg", 500 + 10 * c + v)
    common = [str(root / "gallery"), "--labels", "folder", "--quiet", "--workers", "0"]
    assert main(["index", "build", *common, "--extractor", "colour", "--local", "default", "--out", str(root / "local")]) == 0
    (root / "gallery" / "class0" / "im0.jpg").touch()
    assert main(["index", "sync", str(root / "local"), "--quiet", "--workers", "0"]) == 0  # records content.h5
    assert main(["index", "build", *common, "--extractor", "hash", "--base", "colour", "--out", str(root / "hash")]) == 0
    for name, files in FILES.items():
        assert sorted(p.name for p in (root / name).iterdir()) == files
    return root


def _command(cmd, folder, root):
    img = str(root / "gallery" / "class1" / "im2.jpg")
    return {"verify": ["index", "verify", str(folder)], "info": ["index", "info", str(folder)],
            "query": ["query", "--index", str(folder), img, "--json", "--quiet"],
            "rerank": ["query", "--index", str(folder), img, "--json", "--quiet", "--rerank", "default"],
            "eval": ["eval", "--index", str(folder), "--quiet"]}[cmd]


def _answer(cmd, out, folder):
    """What must not change: the rankings (query), the metrics (eval: all but the timing line), the text (info)."""
    if cmd in ("query", "rerank"):
        return [[(r["name"], r["score"]) for r in q["results"]] for q in json.loads(out)["queries"]]
    lines = out.replace(str(folder), "DIR").splitlines()
    return [ln for ln in lines if "seconds" not in ln]


def _run(capsys, cmd, folder, root):
    rc = main(_command(cmd, folder, root))
    cap = capsys.readouterr()
    return rc, cap.out, [ln for ln in cap.err.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def intact(built):
    """The intact indexes' answers to each command (computed on copies, as the cases are)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    out = {}
    for name in FILES:
        for cmd in READS:
            if cmd == "rerank" and name != "local":
                continue
            folder = built / f"intact-{name}"
            if not folder.exists():
                shutil.copytree(built / name, folder)
            buf = io.StringIO()
            with redirect_stdout(buf), redirect_stderr(io.StringIO()):
                assert main(_command(cmd, folder, built)) == 0
            out[name, cmd] = _answer(cmd, buf.getvalue(), folder)
    return out


def _damage(p: Path, how: str) -> None:
    data = p.read_bytes()
    if how == "delete":
        p.unlink()
    elif how == "flip":  # 16 bytes in the middle inverted: same size, other content
        b = bytearray(data)
        i = len(b) // 2
        b[i : i + 16] = bytes(x ^ 0xFF for x in b[i : i + 16])
        p.write_bytes(bytes(b))
    elif how == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        p.write_bytes(b"")
    else:  # junk
        p.write_bytes(b"this is not an index file\n" * 8)


CASES = [(index, f, how, cmd) for index, files in FILES.items() for f in files for how in DAMAGES for cmd in READS
         if not (cmd == "rerank" and index != "local") and not (index == "hash" and f in ("features.h5", "manifest.json"))]


@pytest.mark.parametrize("index, name, how, cmd", CASES, ids=["-".join(c) for c in CASES])
def test_a_damaged_file(built, intact, tmp_path, capsys, index, name, how, cmd):
    """FILE flipped / truncated / emptied / junk / deleted, each command -> one line naming FILE, rc 2; or (a command
    that does not read FILE, size unchanged) exactly the intact index's answer, rc 0"""
    folder = tmp_path / index
    shutil.copytree(built / index, folder)
    _damage(folder / name, how)
    rc, out, err = _run(capsys, cmd, folder, built)
    reads = READS[cmd] == "*" or name in READS[cmd]
    if reads or how != "flip":
        assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and str(folder / name) in err[0], (rc, err, out[-500:])
        assert "Traceback" not in out
    else:
        assert rc == 0 and _answer(cmd, out, folder) == intact[index, cmd], (rc, err)


@pytest.mark.parametrize("cmd", sorted(READS))
@pytest.mark.parametrize("name", ["features.h5", "knn.h5", "local.h5"])
def test_a_file_replaced_by_a_symlink_out_of_the_folder(built, tmp_path, capsys, cmd, name):
    """FILE replaced by a symbolic link to an identical copy outside the folder -> every command refuses it: one line
    naming FILE ("a symbolic link"), rc 2"""
    folder = tmp_path / "local"
    shutil.copytree(built / "local", folder)
    outside = tmp_path / f"outside-{name}"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    rc, out, err = _run(capsys, cmd, folder, built)
    assert rc == 2 and len(err) == 1 and str(folder / name) in err[0] and "symbolic link" in err[0], (rc, err)
