"""Issue 24.6: a stray file in an index folder is refused before any work by add, remove and compact; and when the swap
itself refuses (a file appeared meanwhile), the new index is kept where the message says."""

import pytest

from cbir import update
from cbir.data import read_file_list
from cbir.engine import Index, add_images, build_index, compact_index, remove_images
from cbir.errors import CbirError
from cbir.index import folder


@pytest.fixture
def built(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries[:6], tmp_path / "idx", extractor="colour", progress=False, workers=0)
    return tmp_path / "idx", entries


@pytest.mark.parametrize("what", ["add", "remove", "compact"])
def test_a_stray_file_is_refused_before_any_work(built, monkeypatch, what):
    out, entries = built
    (out / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def no_work(*a, **k):
        raise AssertionError("the index was opened for work before the folder was checked")

    monkeypatch.setattr(update, "Index", no_work)
    run = {"add": lambda: add_images(out, entries, progress=False), "remove": lambda: remove_images(out, [entries[0].name]),
           "compact": lambda: compact_index(out)}[what]
    with pytest.raises(CbirError, match=r"holds 'notes.txt', which is not part of a cbir index; .* \(nothing was changed\)"):
        run()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not folder.partial_dir(out).exists()


def test_a_file_appearing_during_the_update_keeps_the_new_index_where_the_message_says(built, monkeypatch):
    out, entries = built
    real = folder.commit_folder

    def commit(work, final):
        (final / "appeared.txt").write_text("x")
        return real(work, final)

    monkeypatch.setattr(update, "commit_folder", commit)  # where the update calls it
    with pytest.raises(CbirError, match="appeared during the build; the new index is kept in") as e:
        add_images(out, entries, progress=False, workers=0)
    kept = folder.partial_dir(out) / "commit"
    assert str(kept) in str(e.value) and len(Index(kept)) == 12  # it is there, whole
    assert (out / "appeared.txt").exists() and len(Index(out)) == 6  # the old index stays as it was, the stray file too
