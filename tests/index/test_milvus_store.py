"""``--store milvus:URI`` through the pipeline: build, query, add, remove and rebuild an index whose vectors are in a
Milvus Lite collection, ranked like the faiss store; what the store cannot hold is refused before any work."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from cbir.data import read_file_list
from cbir.engine import Index, add_images, build_index, compact_index, evaluate, remove_images, verify_index
from cbir.errors import CbirError
from cbir.index import manifest

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'cbir[milvus]')")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install 'cbir[milvus]')")

from cbir.index import milvus as mv  # noqa: E402

COLOUR = dict(extractor="colour", progress=False)


@pytest.fixture()
def db(tmp_path):
    path = tmp_path / "gallery.db"
    yield f"milvus:{path}"
    mv.release_lite(str(path))


def _collections(db):
    return set(mv.connect(db.split(":", 1)[1]).list_collections())


def test_a_milvus_index_ranks_like_the_faiss_one_and_takes_updates(small_set, tmp_path, db):
    entries = read_file_list(small_set / "list.txt")
    build_index(entries, tmp_path / "faiss", **COLOUR)
    rep = build_index(entries, tmp_path / "mil", vector_store=db, **COLOUR)
    m = rep.manifest
    assert m["store"]["kind"] == "milvus" and m["faiss"] == manifest.MILVUS_FILE and (tmp_path / "mil" / manifest.MILVUS_FILE).is_file()
    assert not (tmp_path / "mil" / "cosine.faiss").exists()
    a, b = Index(tmp_path / "faiss"), Index(tmp_path / "mil")
    qa = a.query_images([e.path for e in entries], top_k=4)
    qb = b.query_images([e.path for e in entries], top_k=4)
    assert [[r["name"] for r in q["results"]] for q in qa] == [[r["name"] for r in q["results"]] for q in qb]
    for x, y in zip(qa, qb):
        np.testing.assert_allclose([r["score"] for r in x["results"]], [r["score"] for r in y["results"]], atol=1e-5)
    ea = evaluate(tmp_path / "faiss", queries=small_set / "list.txt", progress=False)["metrics"]
    eb = evaluate(tmp_path / "mil", queries=small_set / "list.txt", progress=False)["metrics"]
    assert ea["map"] == pytest.approx(eb["map"], abs=1e-9) and ea["precision@1"] == eb["precision@1"]
    assert verify_index(tmp_path / "mil")["ok"]
    del b

    # remove and add: the collection changes with the folder; a removed image is no longer found
    remove_images(tmp_path / "mil", [entries[0].name])
    idx = Index(tmp_path / "mil")
    assert len(idx) == 11 and idx.index.ntotal == 11
    assert entries[0].name not in [r["name"] for r in idx.query_images([entries[0].path], top_k=11)[0]["results"]]
    del idx
    rep = add_images(tmp_path / "mil", [entries[0]], progress=False)
    idx = Index(tmp_path / "mil")
    assert rep.added == 1 and len(idx) == 12 and idx.query_images([entries[0].path], top_k=1)[0]["results"][0]["name"] == entries[0].name
    with pytest.raises(CbirError, match="nothing to compact"):
        compact_index(tmp_path / "mil")
    del idx

    # a rebuild writes a new collection and drops the replaced one once the new folder is in place
    old = Index(tmp_path / "mil").manifest["store"]["collection"]
    rep = build_index(entries, tmp_path / "mil", vector_store=db, **COLOUR)
    new = rep.manifest["store"]["collection"]
    assert new != old and rep.reused == 12 and new in _collections(db) and old not in _collections(db)


def test_what_milvus_lite_cannot_hold_is_refused_before_any_work(small_set, tmp_path, db):
    entries = read_file_list(small_set / "list.txt")
    with pytest.raises(CbirError, match="no binary vectors"):
        build_index(entries, tmp_path / "h", extractor="hash", conf={"base": "colour", "base_conf": {}}, vector_store=db, progress=False)
    with pytest.raises(CbirError, match="pq"):
        build_index(entries, tmp_path / "p", vector_store=db, search={"codec": "pq", "code_bytes": 8}, **COLOUR)
    with pytest.raises(CbirError, match="unknown --store"):
        build_index(entries, tmp_path / "x", vector_store="redis:x", **COLOUR)
    (tmp_path / "in").mkdir()
    with pytest.raises(CbirError, match="inside the index folder"):
        build_index(entries, tmp_path / "in", vector_store=f"milvus:{tmp_path / 'in' / 'g.db'}", **COLOUR)
    assert not any((tmp_path / n).exists() for n in ("h", "p", "x")) and not list(tmp_path.glob("*.partial"))
    assert not any((tmp_path / "in").iterdir())
