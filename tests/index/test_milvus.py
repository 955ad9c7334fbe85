"""MilvusBackend on an embedded Milvus Lite database in tmp_path: the FaissBackend interface, its rankings and scores
(flat, cosine), pointer files, refusals and the one-process-at-a-time rule of Milvus Lite."""

import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from helpers import REPO, shared

from cbir.errors import CbirError, IndexDamaged, IndexMismatch

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'cbir[milvus]')")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install 'cbir[milvus]')")

from cbir.index import milvus as mv  # noqa: E402
from cbir.index.backend import FaissBackend, SearchSpec  # noqa: E402
from cbir.index.milvus import MilvusBackend, parse_store  # noqa: E402



@pytest.fixture()
def uri(tmp_path):
    u = parse_store(f"milvus:{tmp_path / 'gallery.db'}")[1]
    yield u
    mv.release_lite(u)  # this process' embedded server and its lock on the folder


def _unit(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _faiss(ids, x):
    f = FaissBackend(SearchSpec(metric="cosine", dim_in=x.shape[1]))
    f.add(ids, x)
    return f


def _assert_same_search(a, b, q, k, **kw):
    """Same ids in the same order and the same scores, but for the order among exactly tied scores (faiss' heap leaves
    ties in no particular order; Milvus' are put in id order)."""
    sa, ia = a.search(q, k, **kw)
    sb, ib = b.search(q, k, **kw)
    assert ia.dtype == np.int64 and sa.dtype == np.float32 and ia.shape == ib.shape == (len(q), min(k, b.ntotal))
    np.testing.assert_array_equal(ia >= 0, ib >= 0)
    np.testing.assert_allclose(sa[ia >= 0], sb[ib >= 0], atol=1e-5)  # a -1 slot's score means nothing
    differ = np.argwhere(ia != ib)
    for r, c in differ:
        tied = np.flatnonzero(np.abs(sb[r] - sb[r, c]) <= 1e-6)
        assert len(tied) > 1 and set(ia[r, tied]) == set(ib[r, tied]), f"query {r}, rank {c}: {ia[r, c]} vs {ib[r, c]} (no tie)"
    return len(differ)


def test_add_search_remove_ids_save_open(uri, tmp_path):
    x = _unit(400, 64)
    ids = np.arange(400, dtype=np.int64) * 3 + 7
    labels = [f"l{i % 4}" for i in range(400)]
    spec = SearchSpec(metric="cosine", dim_in=64)
    b = MilvusBackend(spec, uri, "gallery")
    assert b.is_trained and b.ntotal == 0
    b.train(x)  # nothing to learn: flat
    b.add(ids, x * 3.0, names=[f"n{i}" for i in range(400)], labels=labels)  # stored L2-normalised, like faiss
    f = _faiss(ids, x)
    assert b.ntotal == 400 == b.refresh()
    q = _unit(25, 64, seed=1)
    assert _assert_same_search(b, f, q, 10) == 0
    assert _assert_same_search(b, f, q, 1000) == 0  # k cut to the gallery size
    assert _assert_same_search(b, f, x[:25], 10, exclude=ids[:25]) == 0  # leave-one-out
    np.testing.assert_allclose(b.vectors(ids[[5, 2]]), x[[5, 2]], atol=1e-6)
    assert b.fetch(ids[[3]]) == {"name": ["n3"], "label": ["l3"]}
    # label filter: only that label is ranked, in faiss' order over the same subset
    sel = np.array([l == "l2" for l in labels])
    s, i = b.search(q, 8, label="l2")
    _, i_ref = _faiss(ids[sel], x[sel]).search(q, 8)
    np.testing.assert_array_equal(i, i_ref)
    s, i = b.search(q, 8, label=["l1", "l2"])
    assert set(((i - 7) // 3 % 4).ravel().tolist()) <= {1, 2}
    # remove: counts what was stored, ignores the rest
    assert b.remove([ids[0], ids[1], 99999]) == 2
    f.remove([ids[0], ids[1]])
    assert b.ntotal == 398 == b.refresh() == f.ntotal
    np.testing.assert_array_equal(b.ids(), f.ids())
    assert _assert_same_search(b, f, q, 10) == 0
    # save -> pointer file; open in a fresh backend
    ptr = tmp_path / mv.POINTER_FILE
    b.save(ptr)
    rec = json.loads(ptr.read_text())
    assert rec["uri"] == uri and rec["collection"] == "gallery" and rec["index_type"] == "FLAT" and rec["count"] == 398
    b.close()
    b2 = MilvusBackend.open(ptr, SearchSpec(metric="cosine", dim_in=64, nprobe=4))
    assert b2.ntotal == 398 and b2.dim == 64 and b2.describe()["collection"] == "gallery"
    assert _assert_same_search(b2, f, q, 10) == 0
    b2.set_search(nprobe=2, ef=64)
    assert (b2.spec.nprobe, b2.spec.ef) == (2, 64)
    with pytest.raises(IndexMismatch, match="cosine index of 64-d"):
        b2.search(_unit(2, 32), 3)
    b2.close()


def test_rankings_equal_faiss_on_real_descriptors(uri, demo_images):
    """Colour histograms of the demo images (ties and near-ties included): the whole leave-one-out ranking is faiss'."""
    from cbir.data import iter_decoded, Entry
    from cbir.extractors.base import make_extractor

    ext = make_extractor("colour", {})
    entries = [Entry(p.name, p) for p in sorted(demo_images.glob("*.jpg"))]
    x = ext.post(ext.extract([img for _, _, img in iter_decoded(entries, ext.max_side)]))
    ids = np.arange(len(x), dtype=np.int64)
    b = MilvusBackend(SearchSpec(metric="cosine", dim_in=x.shape[1]), uri, "demo_colour")
    b.add(ids, x, names=[e.name for e in entries])
    swapped = _assert_same_search(b, _faiss(ids, x), x, len(x), exclude=ids)
    assert swapped < 0.01 * len(x) ** 2  # here: images without a colour in common, tied at 0 at the end of a ranking
    b.close()


def test_rankings_equal_faiss_on_ukbench56_default_descriptors(uri):
    """The acceptance case: the default extractor on all 56 ukbench56 images, every query's ranking equal to faiss flat."""
    root = shared("instance_ukbench56")
    from cbir.data import iter_decoded, read_file_list
    from cbir.extractors import DEFAULT_EXTRACTOR
    from cbir.extractors.base import make_extractor

    ext = make_extractor(DEFAULT_EXTRACTOR, {})
    entries = read_file_list(root / "gt.csv")
    x = ext.post(ext.extract([img for _, _, img in iter_decoded(entries, ext.max_side)]))
    ids = np.arange(len(x), dtype=np.int64)
    b = MilvusBackend(SearchSpec(metric="cosine", dim_in=x.shape[1]), uri, "ukbench56")
    b.add(ids, x, names=[e.name for e in entries], labels=[e.label for e in entries])
    f = _faiss(ids, x)
    assert _assert_same_search(b, f, x, 4) == 0  # what `cbir query --top-k 4` ranks (the image itself first)
    assert _assert_same_search(b, f, x, len(x), exclude=ids) == 0  # eval's leave-one-out ranking
    b.close()


def test_lite_refuses_binary_pq_pca_float16_with_the_alternative(uri):
    with pytest.raises(CbirError, match="no binary vectors.*milvus:http://.*faiss store"):
        MilvusBackend(SearchSpec(metric="hamming", dim_in=256), uri, "h")
    with pytest.raises(CbirError, match="no product quantisation.*float32 or sq8"):
        MilvusBackend(SearchSpec(metric="cosine", dim_in=64, codec="pq", code_bytes=8), uri, "p")
    with pytest.raises(CbirError, match="drop --dim"):
        MilvusBackend(SearchSpec(metric="cosine", dim_in=64, dim=16), uri, "d")
    with pytest.raises(CbirError, match="float16"):
        MilvusBackend(SearchSpec(metric="cosine", dim_in=64, codec="float16"), uri, "f")
    # a server takes what Lite refuses (checked without one: no Milvus server here)
    mv.check_spec(SearchSpec(metric="hamming", dim_in=256), "http://milvus.example:19530")
    mv.check_spec(SearchSpec(metric="cosine", dim_in=64, codec="pq", code_bytes=8), "http://milvus.example:19530")


def test_server_index_mapping():
    """Spec -> Milvus index (the server code path; Lite has no BIN_* / IVF_PQ, so only the mapping is checked here)."""
    ip = mv.index_params
    assert ip(SearchSpec(metric="hamming", dim_in=256)) == {"index_type": "BIN_FLAT", "metric_type": "HAMMING", "params": {}}
    assert ip(SearchSpec(metric="hamming", dim_in=256, ann="ivf", nlist=32))["index_type"] == "BIN_IVF_FLAT"
    pq = ip(SearchSpec(metric="cosine", dim_in=64, codec="pq", code_bytes=8, ann="ivf", nlist=16))
    assert pq == {"index_type": "IVF_PQ", "metric_type": "IP", "params": {"nlist": 16, "m": 8, "nbits": 8}}
    assert ip(SearchSpec(metric="cosine", dim_in=64))["index_type"] == "FLAT"
    assert ip(SearchSpec(metric="cosine", dim_in=64, ann="ivf", nlist=8))["index_type"] == "IVF_FLAT"
    assert ip(SearchSpec(metric="cosine", dim_in=64, ann="hnsw"))["index_type"] == "HNSW"
    assert ip(SearchSpec(metric="cosine", dim_in=64, codec="sq8", ann="ivf", nlist=8))["index_type"] == "IVF_SQ8"


def test_lite_is_flat_only_and_auto_store_spec_picks_what_a_store_takes(uri):
    for spec in (SearchSpec(metric="cosine", dim_in=32, ann="ivf", nlist=4), SearchSpec(metric="cosine", dim_in=32, ann="hnsw"),
                 SearchSpec(metric="cosine", dim_in=32, codec="sq8")):
        with pytest.raises(CbirError, match="Milvus Lite searches float32 vectors exactly"):
            MilvusBackend(spec, uri, "g")
    lite = mv.auto_store_spec("cosine", 1536, 1_000_000, uri)
    assert (lite.ann, lite.codec, lite.dim) == ("flat", "float32", None)
    server = mv.auto_store_spec("cosine", 1536, 1_000_000, "http://milvus.example:19530")
    assert (server.ann, server.codec, server.dim) == ("ivf", "sq8", None)  # auto's large default, without its PCA
    assert mv.index_params(server)["index_type"] == "IVF_SQ8"
    assert mv.auto_store_spec("hamming", 1536, 10, "http://milvus.example:19530").metric == "hamming"
    with pytest.raises(CbirError, match="no binary vectors"):
        mv.auto_store_spec("hamming", 1536, 10, uri)
    with pytest.raises(CbirError, match="no product quantisation"):
        mv.auto_store_spec("cosine", 64, 10_000, uri, codec="pq", code_bytes=8)


def test_parse_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_store(None) == ("faiss", None) == parse_store("faiss")
    assert parse_store("milvus:./g.db") == ("milvus", str(tmp_path / "g.db"))  # recorded absolute
    assert parse_store("milvus:http://user:secret@db.example:19530") == ("milvus", "http://db.example:19530")
    assert parse_store("milvus:https://db.example") == ("milvus", "https://db.example")
    for bad, msg in (("redis:x", "unknown --store"), ("milvus:", "needs a URI"), ("milvus:ftp://h:1", "unknown URI scheme"),
                     ("milvus:./gallery", "ending in .db"), ("milvus:./nope/g.db", "does not exist"),
                     ("milvus:http://", "no host")):
        with pytest.raises(CbirError, match=msg):
            parse_store(bad)
    (tmp_path / "idx").mkdir()
    with pytest.raises(CbirError, match="inside the index folder"):
        parse_store("milvus:idx/g.db", out=tmp_path / "idx")
    assert parse_store("milvus:g.db", out=tmp_path / "idx")[1] == str(tmp_path / "g.db")
    assert mv.collection_name(tmp_path / "my index-1").startswith("cbir_my_index_1_")


_OTHER_PROCESS = """
import sys
from cbir.errors import CbirError
from cbir.index.milvus import connect
try:
    connect(sys.argv[1])
    print("opened")
except CbirError as e:
    print("refused:", e)
"""


def test_a_second_process_is_refused_with_a_clear_message(uri):
    b = MilvusBackend(SearchSpec(metric="cosine", dim_in=8), uri, "g")
    r = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, uri], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert "refused:" in r.stdout and "open in another process" in r.stdout, (r.stdout, r.stderr[-1500:])
    assert "Traceback" not in r.stderr  # milvus-lite's own traceback is not shown
    b.close()
    mv.release_lite(uri)  # released: another process can open it now
    r = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, uri], capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert r.stdout.strip() == "opened", (r.stdout, r.stderr[-1500:])


def test_damaged_pointer_missing_collection_wrong_dim_and_topk_limit(uri, tmp_path, monkeypatch):
    ptr = tmp_path / mv.POINTER_FILE
    ptr.write_text("{not json")
    with pytest.raises(IndexDamaged, match="damaged Milvus pointer"):
        MilvusBackend.open(ptr)
    b = MilvusBackend(SearchSpec(metric="cosine", dim_in=8), uri, "g")
    b.add([1, 2, 3], _unit(3, 8))
    b.save(ptr)
    with pytest.raises(IndexDamaged, match="dim_in"):
        MilvusBackend.open(ptr, SearchSpec(metric="cosine", dim_in=16))
    with pytest.raises(IndexMismatch, match="holds 8-d"):
        MilvusBackend.attach(SearchSpec(metric="cosine", dim_in=16), uri, "g")
    with pytest.raises(CbirError, match="exists already"):
        MilvusBackend(SearchSpec(metric="cosine", dim_in=8), uri, "g")
    monkeypatch.setattr(mv.collection, "MAX_TOPK", 2)  # the module whose search reads it
    with pytest.raises(CbirError, match="at most 2 results"):
        b.search(_unit(1, 8), 3)
    b.drop()
    with pytest.raises(CbirError, match="no Milvus collection 'g'"):
        MilvusBackend.open(ptr)
    assert MilvusBackend(SearchSpec(metric="cosine", dim_in=8), uri, "g", overwrite=True).ntotal == 0
    with pytest.raises(CbirError, match="zero or non-finite"):
        b.add([9], np.zeros((1, 8), np.float32))


def test_missing_pymilvus_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(CbirError, match=r"pip install 'cbir\[milvus\]'"):
        mv.connect("/tmp/x.db")
