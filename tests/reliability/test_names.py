"""Issue 24.8: one file has one name whatever its spelling in a list (`./img/x`, `img//x`, absolute); absolute paths of
this machine do not become names; a file whose name ends in a space can be indexed."""

import shutil

from cbir.data import read_file_list
from cbir.engine import Index, add_images, build_index, remove_images


def test_spellings_of_one_file_are_one_name(small_set):
    lst = small_set / "spell.txt"
    lst.write_text(f"img/g0_0.jpg\n./img/g0_0.jpg\nimg//g0_0.jpg\nimg/./g0_0.jpg\n{small_set / 'img' / 'g0_0.jpg'}\n")
    assert {e.name for e in read_file_list(lst)} == {"img/g0_0.jpg"}


def test_adding_one_file_under_several_spellings_adds_it_once(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    out = tmp_path / "idx"
    build_index(entries[:6], out, extractor="colour", progress=False, workers=0)
    lst = small_set / "spell.txt"
    lst.write_text(f"./img/g2_0.jpg\nimg//g2_0.jpg\n{small_set / 'img' / 'g2_0.jpg'}\n")
    rep = add_images(out, read_file_list(lst), progress=False, workers=0)
    assert (rep.added, rep.count) == (1, 7)
    # already indexed under another name (an index built before names were normalised): found by its file
    odd = tmp_path / "elsewhere.txt"
    odd.write_text(f"{small_set / 'img' / 'g2_0.jpg'}\n{small_set / 'img' / 'g0_1.jpg'}\n")
    rep = add_images(out, read_file_list(odd), progress=False, workers=0)
    assert (rep.added, rep.count) == (0, 7)
    rep = remove_images(out, read_file_list(odd))  # and removed by its file
    assert (rep.removed, rep.count) == (2, 5)


def test_absolute_paths_outside_the_lists_folder_are_not_names(small_set, tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    lst = lists / "abs.txt"
    lst.write_text("".join(f"{small_set / 'img' / n}\n" for n in ("g0_0.jpg", "g1_0.jpg")))
    names = [e.name for e in read_file_list(lst)]
    assert names == ["g0_0.jpg", "g1_0.jpg"] and not any(str(tmp_path) in n for n in names)
    out = tmp_path / "idx"
    build_index(read_file_list(lst), out, extractor="colour", progress=False, workers=0)
    idx = Index(out)
    assert list(idx.names) == names and not any(n.startswith("/") for n in idx.names)


def test_a_file_name_ending_in_a_space_can_be_indexed(small_set, tmp_path):
    shutil.copy(small_set / "img" / "g0_0.jpg", small_set / "img" / "sp.jpg ")
    lst = small_set / "space.txt"
    lst.write_text("img/sp.jpg \tgroup0\nimg/g1_0.jpg \tgroup1\n")  # the second: a stray space, the file has none
    entries = read_file_list(lst)
    assert [e.name for e in entries] == ["img/sp.jpg ", "img/g1_0.jpg"] and all(e.path.is_file() for e in entries)
    out = tmp_path / "idx"
    build_index(entries, out, extractor="colour", progress=False, workers=0)
    assert list(Index(out).names) == ["img/sp.jpg ", "img/g1_0.jpg"]


def test_eval_leaves_a_query_out_by_its_file_in_an_index_named_by_absolute_paths(small_set, tmp_path):
    """An index built before names were normalised holds absolute paths as names; the same absolute query list now reads
    as relative names, and the query is still found in the gallery (by its file) and left out of its own relevant set."""
    from cbir.data import Entry
    from cbir.engine import evaluate

    imgs = [small_set / "img" / n for n in ("g0_0.jpg", "g0_1.jpg", "g1_0.jpg", "g2_0.jpg")]
    labels = ["a", "a", "b", "c"]
    out = tmp_path / "idx"
    build_index([Entry(str(p), p, l) for p, l in zip(imgs, labels)], out, extractor="colour", progress=False, workers=0)
    assert all(n.startswith("/") for n in Index(out).names)
    q = tmp_path / "lists" / "q.txt"
    q.parent.mkdir()
    q.write_text(f"{imgs[0]}\ta\n{imgs[3]}\tc\n")
    rep = evaluate(out, queries=q, progress=False)
    assert rep["n_queries_without_relevant"] == 1 and rep["n_queries"] == 1  # g2_0 (c) is alone once itself is left out
