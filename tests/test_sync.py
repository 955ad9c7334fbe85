"""``cbir index sync`` (cbir/sync.py): new, changed, touched and deleted files; a no-op decodes nothing; resume."""

import json
import os
import time

import numpy as np
import pytest

from helpers import write_textured

from cbir.errors import CbirError
from cbir.sync import read_content, sync_index


_img = write_textured


@pytest.fixture
def built(tmp_path):
    from cbir.engine import build_index
    from cbir.folders import scan_folder

    d = tmp_path / "photos"
    for i in range(5):
        _img(d / f"g{i % 2}" / f"p{i}.png", 200 + i)
    out = tmp_path / "idx"
    build_index(scan_folder(d, labels="folder").entries, out, extractor="colour", progress=False,
                dataset={"folder": str(d), "labels": "folder"})
    return d, out


def _no_decoding(monkeypatch):
    import cbir.data

    def refuse(*a, **k):
        raise AssertionError("decoded an image")

    monkeypatch.setattr(cbir.data.decode, "decode_image", refuse)


def _names(out):
    from cbir.query import Index

    return sorted(str(n) for n in Index(out).names)


def test_sync_adds_changes_removes_then_does_nothing(built, monkeypatch):
    d, out = built
    _img(d / "g0" / "new.png", 300)
    _img(d / "top.png", 301)
    os.remove(d / "g1" / "p1.png")
    time.sleep(0.01)
    _img(d / "g0" / "p0.png", 302)  # new content under an old name
    rep = sync_index(out, progress=False)
    assert (sorted(rep.added), rep.changed, rep.removed, rep.failed) == (["g0/new.png", "top.png"], ["g0/p0.png"], ["g1/p1.png"], [])
    assert rep.count == 6 and _names(out) == ["g0/new.png", "g0/p0.png", "g0/p2.png", "g0/p4.png", "g1/p3.png", "top.png"]
    from cbir.query import Index

    idx = Index(out)
    hit = idx.query_images([str(d / "g0" / "p0.png")], top_k=1)[0]["results"][0]
    assert hit["name"] == "g0/p0.png" and hit["score"] > 0.999 and hit["label"] == "g0"
    assert idx.labels[idx.row("top.png")] is None  # --labels folder kept from the build: no sub-folder, no label
    assert set(read_content(out)) == set(_names(out))  # every gallery file's content recorded
    before = (out / "manifest.json").stat().st_mtime_ns
    _no_decoding(monkeypatch)
    again = sync_index(out, progress=False)
    assert (again.added, again.changed, again.removed, again.hashed) == ([], [], [], 0)
    assert (out / "manifest.json").stat().st_mtime_ns == before  # nothing written either


def test_a_touched_file_with_the_same_content_is_not_extracted_again(built, monkeypatch):
    d, out = built
    sync_index(out, progress=False)  # first sync: records the gallery's content
    p = d / "g0" / "p2.png"
    st = p.stat()
    os.utime(p, (st.st_atime, st.st_mtime + 100))
    _no_decoding(monkeypatch)
    rep = sync_index(out, progress=False)
    assert rep.touched == ["g0/p2.png"] and rep.changed == [] and rep.hashed == 1
    assert sync_index(out, progress=False).hashed == 0  # the new mtime was recorded


def test_a_killed_sync_resumes_and_still_calls_changed_files_changed(built, monkeypatch):
    import cbir.sync

    d, out = built
    _img(d / "g1" / "p3.png", 400)
    real = cbir.sync.add_images

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cbir.sync, "add_images", killed)
    with pytest.raises(KeyboardInterrupt):
        sync_index(out, progress=False)
    assert "g1/p3.png" not in _names(out) and (out.parent / "idx.sync.json").is_file()
    monkeypatch.setattr(cbir.sync, "add_images", real)
    rep = sync_index(out, progress=False)
    assert rep.changed == ["g1/p3.png"] and rep.added == [] and rep.count == 5
    assert not (out.parent / "idx.sync.json").exists()


def test_unreadable_new_files_are_failed_and_the_rest_goes_in(built):
    d, out = built
    (d / "g0" / "broken.jpg").write_bytes(b"not a jpeg")
    _img(d / "g1" / "ok.png", 500)
    rep = sync_index(out, progress=False)
    assert rep.added == ["g1/ok.png"] and [f["name"] for f in rep.failed] == ["g0/broken.jpg"] and rep.count == 6


def test_sync_needs_the_folder_it_was_built_from(built, tmp_path):
    from cbir.engine import build_index
    from cbir.folders import scan_folder

    d, out = built
    other = tmp_path / "other"
    _img(other / "x.png", 9)
    with pytest.raises(CbirError, match="holds none of the 5 images"):
        sync_index(out, other, progress=False)
    lst = tmp_path / "lst"
    build_index(scan_folder(d).entries, lst, extractor="colour", progress=False, dataset={"list": "some.txt"})
    with pytest.raises(CbirError, match="was not built from a folder"):
        sync_index(lst, progress=False)
    assert sync_index(lst, d, progress=False, dry_run=True).added == []


def test_cli_sync_json_and_text(built, capsys):
    from cbir.cli import main

    d, out = built
    os.remove(d / "g0" / "p4.png")
    assert main(["index", "sync", str(out), "--dry-run", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["removed"] == ["g0/p4.png"] and "g0/p4.png" in _names(out)
    assert main(["index", "sync", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "0 added, 0 changed, 1 removed, 0 failed" in text and "removed  g0/p4.png" in text
    assert main(["index", "sync", str(out), "--json", "--quiet"]) == 0
    d2 = json.loads(capsys.readouterr().out)
    assert {k: d2[k] for k in ("added", "changed", "removed", "failed")} == {"added": [], "changed": [], "removed": [], "failed": []}
    assert main(["index", "sync", str(out.parent / "nope"), "--quiet"]) == 2
