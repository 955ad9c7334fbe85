"""SearchSpec / FaissBackend: the 8-bit scalar codec, the uncentred PCA and auto_spec's large-gallery default."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.index.backend import FaissBackend, SearchSpec, auto_spec


def _data(n=3000, d=64, seed=0):
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, d)).astype(np.float32)
    x = rng.standard_normal((n, 16)).astype(np.float32) @ basis + 0.1 * rng.standard_normal((n, d)).astype(np.float32) + 2.0
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_auto_spec_large_default_is_uncentred_pca512_sq8_and_budget_still_picks_pq():
    big = auto_spec("cosine", 1536, 200_000)
    assert (big.ann, big.codec, big.dim, big.pca_centre, big.nlist) == ("ivf", "sq8", 512, False, 2048)
    assert big.bytes_per_image == 520 and FaissBackend.factory_string(big) == "PCA512,L2norm,IVF2048,SQ8"
    assert auto_spec("cosine", 1536, 1000).ann == "flat"
    small = auto_spec("cosine", 1536, 1_000_000, memory_budget=100e6)
    assert (small.codec, small.dim, small.pca_centre, small.code_bytes) == ("pq", 256, True, 64)
    assert SearchSpec.from_json({k: v for k, v in big.to_json().items() if k != "pca_centre"}).pca_centre is True  # old manifests
    assert SearchSpec.from_json(big.to_json()) == big
    with pytest.raises(CbirError, match="hnsw"):
        FaissBackend.factory_string(SearchSpec(dim_in=64, codec="sq8", ann="hnsw"))


def test_uncentred_pca_keeps_inner_products_and_sq8_ivf_adds_removes_saves(tmp_path):
    import faiss

    x = _data()
    ids = np.arange(len(x)) * 3 + 1
    spec = SearchSpec(dim_in=64, dim=16, pca_centre=False, codec="sq8", ann="ivf", nlist=16, nprobe=16)
    b = FaissBackend(spec)
    b.train(x)
    pca = faiss.downcast_VectorTransform(faiss.downcast_index(b.index).chain.at(0))
    assert np.all(faiss.vector_to_array(pca.b) == 0)
    b.add(ids, x)
    assert spec.bytes_per_image == 16 + 8
    exact = np.argsort(-(x[:50] @ x.T), axis=1)[:, :10]
    _, found = b.search(x[:50], 10)
    rec = np.mean([len(set(f) & set(ids[e])) / 10 for f, e in zip(found, exact)])
    centred = FaissBackend(SearchSpec(dim_in=64, dim=16, codec="sq8", ann="ivf", nlist=16, nprobe=16))
    centred.train(x)
    centred.add(ids, x)
    _, found_c = centred.search(x[:50], 10)
    rec_c = np.mean([len(set(f) & set(ids[e])) / 10 for f, e in zip(found_c, exact)])
    assert rec >= 0.9 and rec >= rec_c
    assert b.remove(ids[:10]) == 10 and b.ntotal == len(x) - 10
    b.save(tmp_path / "x.faiss")
    c = FaissBackend.open(tmp_path / "x.faiss", spec)
    s1, i1 = b.search(x[:5], 5)
    s2, i2 = c.search(x[:5], 5)
    assert (i1 == i2).all() and np.allclose(s1, s2) and not np.isin(ids[:10], c.ids()).any()
