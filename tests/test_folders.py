"""A folder wherever a list is taken (cbir/folders.py): the walk, what it skips, names and labels, and the CLI forms."""

import json
import os

import numpy as np
import pytest

from helpers import write_textured

from cbir.errors import CbirError
from cbir.folders import IMAGE_EXTENSIONS, expand_images, read_images, scan_folder


_img = write_textured


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    _img(d / "cats" / "c10.jpg", 1)
    _img(d / "cats" / "c2.jpg", 2)
    _img(d / "mugs" / "deeper" / "m1.png", 3)
    _img(d / "top.jpg", 4)
    _img(d / ".cache" / "hidden.jpg", 5)
    _img(d / "cats" / ".hidden.jpg", 6)
    (d / "mugs" / "notes.txt").write_text("not an image")
    outside = tmp_path / "elsewhere"
    _img(outside / "out.jpg", 7)
    os.symlink(outside / "out.jpg", d / "link_out.jpg")
    os.symlink(outside, d / "dir_out")
    os.symlink(d / "cats", d / "mugs" / "cats_again")  # inside, but a folder already walked
    return d


def test_walk_is_sorted_skips_hidden_non_images_and_outside_links(photos):
    s = scan_folder(photos, labels="folder")
    assert [e.name for e in s.entries] == ["cats/c2.jpg", "cats/c10.jpg", "mugs/deeper/m1.png", "top.jpg"]
    assert [e.label for e in s.entries] == ["cats", "cats", "mugs", None]
    assert s.skipped["hidden"] == 2 and s.skipped["not_image"] == 1
    assert s.skipped["outside_links"] == 3  # a file link and a folder link out of it, a link back to cats/
    assert all(e.path.is_file() and str(e.path).startswith(str(photos)) for e in s.entries)
    assert "2 hidden" in s.summary() and "1 not image" in s.summary()


def test_a_link_inside_the_folder_is_followed(photos):
    os.symlink(photos / "top.jpg", photos / "alias.jpg")
    names = [e.name for e in scan_folder(photos).entries]
    assert "alias.jpg" in names and "top.jpg" in names
    assert all(e.label is None for e in scan_folder(photos).entries)


def test_one_list_of_extensions():
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif"} <= IMAGE_EXTENSIONS and ".txt" not in IMAGE_EXTENSIONS


def test_read_images_takes_a_list_or_a_folder_and_says_what_else_it_got(photos, tmp_path):
    assert len(read_images(photos)) == 4
    lst = tmp_path / "list.txt"
    lst.write_text("photos/cats/c2.jpg\nphotos/top.jpg\n")
    got = read_images(lst, labels="folder")
    assert [e.name for e in got] == ["photos/cats/c2.jpg", "photos/top.jpg"] and got[0].label == "photos"
    with pytest.raises(CbirError, match="not found"):
        read_images(tmp_path / "nope")
    os.symlink(tmp_path / "missing", tmp_path / "broken")
    with pytest.raises(CbirError, match="neither a file list nor a folder"):
        read_images(tmp_path / "broken")
    (tmp_path / "empty" / ".x").mkdir(parents=True)
    with pytest.raises(CbirError, match="holds no image"):
        read_images(tmp_path / "empty")
    with pytest.raises(CbirError, match="--root"):
        read_images(photos, root=tmp_path)


def test_expand_images_replaces_folders_by_their_images(photos):
    files, scans = expand_images([str(photos / "top.jpg"), str(photos / "cats")])
    assert [os.path.basename(f) for f in files] == ["top.jpg", "c2.jpg", "c10.jpg"] and len(scans) == 1


def test_cli_build_positional_folder_labels_query_and_eval(photos, tmp_path, capsys):
    from cbir.cli import main

    out = tmp_path / "idx"
    assert main(["index", "build", str(photos), "--labels", "folder", "--extractor", "colour", "--out", str(out), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 4 and summary["folder"]["skipped"]["hidden"] == 2
    m = json.loads((out / "manifest.json").read_text())
    assert m["dataset"]["folder"] == str(photos) and m["dataset"]["labels"] == "folder"
    assert main(["query", "--index", str(out), str(photos / "cats"), "--top-k", "1", "--json", "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)["queries"]
    assert [q["results"][0]["name"] for q in res] == ["cats/c2.jpg", "cats/c10.jpg"]
    assert res[0]["results"][0]["label"] == "cats"
    rep = tmp_path / "eval.json"
    assert main(["eval", "--index", str(out), "--queries", str(photos), "--labels", "folder", "--json", str(rep), "--quiet"]) == 0
    assert json.loads(rep.read_text())["n_queries"] == 2  # the cats (mugs and top have no other image of their label)


def test_cli_errors_name_the_path(tmp_path, capsys):
    from cbir.cli import main

    os.mkfifo(tmp_path / "pipe")
    assert main(["index", "build", "--list", str(tmp_path / "pipe"), "--out", str(tmp_path / "i"), "--quiet"]) == 2
    assert "neither a file list nor a folder" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "i"), "--quiet"]) == 2
    assert "nope: not found" in capsys.readouterr().err


def test_cli_add_takes_a_folder(photos, tmp_path, capsys):
    from cbir.cli import main

    out = tmp_path / "idx"
    assert main(["index", "build", "--list", str(photos / "cats"), "--extractor", "colour", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    _img(photos / "cats" / "c3.jpg", 9)
    assert main(["index", "add", "--index", str(out), "--list", str(photos / "cats"), "--json", "--quiet"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["added"] == 1 and d["count"] == 3 and d["skipped"] == ["c2.jpg", "c10.jpg"]
