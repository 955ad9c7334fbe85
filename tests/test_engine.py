"""The pipeline end to end on small sets: round trip, resume, bad input, atomic writes, mismatches."""

import json
import os
import time

import numpy as np
import pytest

from cbir.data import read_file_list
from cbir.engine import Index, build_index, evaluate
from cbir.errors import CbirError, IndexMismatch
from cbir.extractors.colour import ColourExtractor
from cbir.index import store

COLOUR = dict(extractor="colour", progress=False)


def test_round_trip_layout_and_search(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    rep = build_index(entries, tmp_path / "idx", **COLOUR)
    assert rep.count == 12 and rep.extracted == 12 and not rep.failures
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert m["format_version"] == store.FORMAT_VERSION and m["metric"] == "cosine" and m["count"] == 12
    assert m["extractor"]["name"] == "colour" and m["dim"] == 256
    assert sorted(os.listdir(tmp_path / "idx")) == ["cosine.faiss", "features.h5", "knn.h5", "manifest.json"]  # knn.h5: the graph stage
    assert not (tmp_path / "idx.partial").exists()

    idx = Index(tmp_path / "idx")
    assert list(idx.names) == [e.name for e in entries]
    assert idx.labels[0] == "group0"
    # a gallery image finds itself first with cosine 1
    res = idx.query_images([entries[5].path], top_k=3)[0]["results"]
    assert res[0]["name"] == entries[5].name and res[0]["score"] == pytest.approx(1.0, abs=1e-5)
    # the stored descriptors equal a fresh extraction
    fresh = ColourExtractor().describe([__import__("cbir.data", fromlist=["x"]).decode_image(entries[0].path, max_side=256)])
    np.testing.assert_allclose(idx.descriptors[0], fresh[0], atol=1e-6)


def test_eval_leave_one_out_excludes_self(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **COLOUR)
    rep = evaluate(tmp_path / "idx", queries=small_set / "list.txt", progress=False)
    assert rep["leave_one_out"] and rep["n_queries"] == 12
    assert rep["metrics"]["ns_score"] <= 4.0  # groups of 4: N-S reported
    # compare with a brute-force leave-one-out computation
    idx = Index(tmp_path / "idx")
    X = idx.descriptors
    S = X @ X.T
    np.fill_diagonal(S, -np.inf)
    order = np.argsort(-S, 1, kind="stable")
    lab = np.array(idx.labels)
    rel = lab[order[:, :-1]] == lab[:, None]
    p1 = rel[:, 0].mean()
    assert rep["metrics"]["precision@1"] == pytest.approx(p1)
    ap = ((np.cumsum(rel, 1) / np.arange(1, 12)) * rel).sum(1) / 3
    assert rep["metrics"]["map"] == pytest.approx(ap.mean(), abs=1e-6)


def test_bad_files_are_named_skipped_and_strict_writes_nothing(small_set, tmp_path):
    (small_set / "img" / "empty.jpg").write_bytes(b"")
    (small_set / "img" / "text.jpg").write_text("not an image")
    good = (small_set / "img" / "g0_0.jpg").read_bytes()
    (small_set / "img" / "trunc.jpg").write_bytes(good[: len(good) // 3])
    lst = small_set / "list.txt"
    lst.write_text(lst.read_text() + "img/empty.jpg\tx\nimg/text.jpg\tx\nimg/trunc.jpg\tx\nimg/missing.jpg\tx\n")
    entries = read_file_list(lst)
    rep = build_index(entries, tmp_path / "idx", **COLOUR)
    causes = {os.path.basename(f["path"]): f["cause"] for f in rep.failures}
    assert set(causes) == {"empty.jpg", "text.jpg", "trunc.jpg", "missing.jpg"}
    assert "empty" in causes["empty.jpg"] and "not an image" in causes["text.jpg"]
    assert "truncated" in causes["trunc.jpg"] and "not found" in causes["missing.jpg"]
    assert rep.count == 12
    m = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert len(m["failures"]) == 4

    with pytest.raises(CbirError, match="--strict"):
        build_index(entries, tmp_path / "strict", strict=True, **COLOUR)
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_interrupted_build_resumes(small_set, tmp_path, monkeypatch):
    entries = read_file_list(small_set / "list.txt")
    calls = {"n": 0}
    real = ColourExtractor.extract

    def flaky(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third batch
        return real(self, images)

    monkeypatch.setattr(ColourExtractor, "extract", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_index(entries, tmp_path / "idx", batch_size=4, **COLOUR)
    assert not (tmp_path / "idx").exists()  # never a half index
    assert list((tmp_path / "idx.partial" / "rows").glob("part-*.h5"))
    monkeypatch.setattr(ColourExtractor, "extract", real)
    rep = build_index(entries, tmp_path / "idx", batch_size=4, **COLOUR)
    assert (rep.reused, rep.extracted, rep.count) == (8, 4, 12)
    assert not (tmp_path / "idx.partial").exists()


def test_segment_torn_by_a_crash_costs_only_its_batch(small_set, tmp_path, monkeypatch):
    entries = read_file_list(small_set / "list.txt")
    real = ColourExtractor.extract
    calls = {"n": 0}

    def dies(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(ColourExtractor, "extract", dies)
    with pytest.raises(KeyboardInterrupt):
        build_index(entries, tmp_path / "idx", batch_size=4, **COLOUR)
    parts = sorted((tmp_path / "idx.partial" / "rows").glob("part-*.h5"))
    assert len(parts) == 2
    parts[-1].write_bytes(parts[-1].read_bytes()[:100])  # as if killed in the middle of the write
    (tmp_path / "idx.partial" / "rows" / "part-0000003.tmp").write_bytes(b"half")
    (tmp_path / "idx.partial" / "rows" / "part-0000004.h5").write_bytes(b"")  # renamed, never written: a power cut
    monkeypatch.setattr(ColourExtractor, "extract", real)
    rep = build_index(entries, tmp_path / "idx", batch_size=4, **COLOUR)
    assert (rep.reused, rep.extracted, rep.count) == (4, 8, 12)


def test_rebuild_reuses_rows_and_re_extracts_changed_files(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **COLOUR)
    rep = build_index(entries, tmp_path / "idx", **COLOUR)
    assert (rep.reused, rep.extracted) == (12, 0)
    p = entries[0].path
    later = time.time() + 5
    os.utime(p, (later, later))
    rep = build_index(entries, tmp_path / "idx", **COLOUR)
    assert (rep.reused, rep.extracted) == (11, 1)
    # another extractor configuration extracts everything again
    rep = build_index(entries, tmp_path / "idx", extractor="colour", conf={"bins": [8, 3, 3]}, progress=False)
    assert rep.extracted == 12 and Index(tmp_path / "idx").descriptors.shape[1] == 72


def test_failed_finalise_keeps_the_old_index(small_set, tmp_path, monkeypatch):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries[:6], tmp_path / "idx", **COLOUR)
    from cbir.index import backend

    def boom(self, path):
        raise OSError("disk full")

    monkeypatch.setattr(backend.FaissBackend, "save", boom)
    with pytest.raises(OSError):
        build_index(entries, tmp_path / "idx", **COLOUR)
    assert Index(tmp_path / "idx").index.ntotal == 6  # the previous index is intact


def test_mismatches_are_refused(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **COLOUR)
    idx = Index(tmp_path / "idx")
    with pytest.raises(IndexMismatch, match="built with extractor 'colour'"):
        idx.check_extractor("pooled")
    with pytest.raises(IndexMismatch, match="does not fit a cosine index of 256"):
        idx.search(np.ones((1, 10), np.float32), 3)
    with pytest.raises(CbirError, match="not a cbir index"):
        Index(tmp_path / "nothing")


def test_unlabelled_gallery_cannot_be_evaluated(small_set, tmp_path):
    lst = small_set / "plain.txt"
    lst.write_text("\n".join(l.split("\t")[0] for l in (small_set / "list.txt").read_text().splitlines()) + "\n")
    build_index(read_file_list(lst), tmp_path / "idx", **COLOUR)
    with pytest.raises(CbirError, match="no labels"):
        evaluate(tmp_path / "idx", progress=False)


def test_hash_index_round_trip_and_rebuild(small_set, tmp_path):
    """mean-hash codes of a float base: Hamming index, centre learned on the gallery, rows reused on rebuild."""
    entries = read_file_list(small_set / "list.txt")
    conf = {"base": "colour", "base_conf": {}}
    rep = build_index(entries, tmp_path / "h", extractor="hash", conf=conf, progress=False)
    m = rep.manifest
    assert m["metric"] == "hamming" and m["kind"] == "binary" and m["code_bits"] == 256
    idx = Index(tmp_path / "h")
    assert idx.codes.shape == (12, 32) and idx.codes.dtype == np.uint8
    # a gallery image's code is found at Hamming distance 0
    res = idx.query_images([entries[7].path], top_k=2)[0]["results"]
    assert res[0]["name"] == entries[7].name and res[0]["score"] == 1.0
    # the codes are the centred mean-hash of the stored float descriptors
    from cbir.extractors.hashing import mean_hash, pack_codes

    np.testing.assert_array_equal(idx.codes, pack_codes(mean_hash(idx.descriptors - idx.extractor.mean_)))
    # features.h5 keeps what search needs: no raw rows unless --keep-raw; then a rebuild reuses them
    assert "raw" not in store.read_rows(tmp_path / "h" / store.FEATURES)[0] and m["keep_raw"] is False
    rep2 = build_index(entries, tmp_path / "h", extractor="hash", conf=conf, progress=False, keep_raw=True)
    assert rep2.extracted == 12 and rep2.reused == 0  # the centre is learned again: raw rows were not kept
    assert store.read_rows(tmp_path / "h" / store.FEATURES)[0]["raw"].shape == (12, 256) and rep2.manifest["keep_raw"]
    rep2 = build_index(entries, tmp_path / "h", extractor="hash", conf=conf, progress=False, keep_raw=True)
    assert rep2.extracted == 0 and rep2.reused == 12
    np.testing.assert_array_equal(Index(tmp_path / "h").codes, idx.codes)
    ev = evaluate(tmp_path / "h", queries=small_set / "list.txt", progress=False)
    assert ev["metric"] == "hamming" and 0 <= ev["metrics"]["map"] <= 1


def test_query_images_collects_bad_files_when_asked(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **COLOUR)
    idx = Index(tmp_path / "idx")
    (tmp_path / "bad.jpg").write_bytes(b"")
    paths = [entries[0].path, tmp_path / "bad.jpg", tmp_path / "missing.jpg", entries[9].path]
    failures = []
    res = idx.query_images(paths, top_k=2, failures=failures)
    assert [q["query"] for q in res] == [str(entries[0].path), str(entries[9].path)]
    assert res[1]["results"][0]["name"] == entries[9].name and res[1]["query_label"] == "group2"
    assert [(f["position"], os.path.basename(f["path"])) for f in failures] == [(1, "bad.jpg"), (2, "missing.jpg")]
    assert "empty" in failures[0]["cause"] and failures[1]["cause"] == "file not found"
    # the library's default: the first unreadable query raises
    with pytest.raises(CbirError, match="empty"):
        idx.query_images(paths, top_k=2)
    with pytest.raises(CbirError, match="top_k"):
        idx.query_images(paths[:1], top_k=0)


def test_eval_counts_queries_without_relevant_items_apart(small_set, tmp_path, capsys):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **COLOUR)
    # gallery names as queries (leave-one-out), two of them with a label the gallery lacks
    q = tmp_path / "q.txt"
    q.write_text("".join(f"{e.name}\t{'missing' if i in (3, 7) else e.label}\n" for i, e in enumerate(entries)))
    rep = evaluate(tmp_path / "idx", queries=q, root=small_set, progress=False)
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "2 of 12 queries have no relevant image" in err and "'missing'" in err
    assert rep["n_queries"] == 10 and rep["n_queries_listed"] == 12 and rep["n_queries_without_relevant"] == 2
    assert [x["label"] for x in rep["queries_without_relevant"]] == ["missing", "missing"]
    json.dumps(rep, allow_nan=False)  # strict JSON: no NaN anywhere
    assert all(v is not None for v in rep["metrics"].values())
    assert rep["leave_one_out"]
    # the metrics are those of the 10 others alone
    keep = [l for i, l in enumerate((small_set / "list.txt").read_text().splitlines()) if i not in (3, 7)]
    (tmp_path / "ten.txt").write_text("\n".join(keep) + "\n")
    ten = evaluate(tmp_path / "idx", queries=tmp_path / "ten.txt", root=small_set, progress=False)
    assert ten["n_queries"] == 10 and ten["metrics"] == rep["metrics"]
    # a query that is the only gallery image of its label has nothing relevant either (leave-one-out)
    lst = tmp_path / "single.txt"
    lst.write_text((small_set / "list.txt").read_text().replace("img/g2_3.jpg\tgroup2", "img/g2_3.jpg\tlonely"))
    build_index(read_file_list(lst, root=small_set), tmp_path / "idx2", **COLOUR)
    rep2 = evaluate(tmp_path / "idx2", queries=lst, root=small_set, progress=False)
    assert rep2["n_queries"] == 11 and rep2["queries_without_relevant"] == [{"name": "img/g2_3.jpg", "label": "lonely"}]
    assert "no other gallery image has its label" in capsys.readouterr().err


def test_eval_without_any_evaluable_query_raises(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "idx", **COLOUR)
    q = tmp_path / "q.txt"
    q.write_text(f"{entries[0].path}\tnowhere\n{entries[5].path}\tnowhere\n")
    with pytest.raises(CbirError, match="no query can be evaluated: none of the 2 queries"):
        evaluate(tmp_path / "idx", queries=q, progress=False)
    # the only queries with a relevant label are unreadable
    q.write_text(f"{tmp_path / 'missing.jpg'}\tgroup0\n{entries[5].path}\tnowhere\n")
    with pytest.raises(CbirError, match="could not be read.*missing.jpg: file not found"):
        evaluate(tmp_path / "idx", queries=q, progress=False)
    with pytest.raises(CbirError, match="cut-offs"):
        evaluate(tmp_path / "idx", ks=(0, 5), progress=False)


def test_the_final_write_streams_rows_chunk_by_chunk(small_set, tmp_path, monkeypatch):
    """Memory of the finalise step is one chunk of rows (and a training sample), never all N: with a 1-byte budget
    every read of the row segments after the first holds one row, and the index is the same as written at once."""
    import cbir.build as build

    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "once", **COLOUR)
    sizes = []
    real = store.RowSegments.gather

    def gather(files, locs):
        sizes.append(len(locs))
        return real(files, locs)

    monkeypatch.setattr(store.RowSegments, "gather", staticmethod(gather))
    monkeypatch.setattr(store, "read_rows", lambda *a, **k: pytest.fail("the final write must not load every row"))
    monkeypatch.setattr(build, "FINAL_CHUNK_BYTES", 1)
    build_index(entries, tmp_path / "streamed", **COLOUR)
    monkeypatch.undo()
    assert max(sizes) == 1 and len(sizes) == 1 + len(entries)
    a, b = Index(tmp_path / "once"), Index(tmp_path / "streamed")
    np.testing.assert_array_equal(a.descriptors, b.descriptors)
    assert list(a.names) == list(b.names)
