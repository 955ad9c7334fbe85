"""Cosine and Hamming indexes: order equals brute force, leave-one-out, persistence, clear mismatches."""

import numpy as np
import pytest

from cbir.errors import CbirError, IndexMismatch
from cbir.extractors.hashing import mean_hash, pack_codes
from cbir.index.faiss_index import CosineIndex, HammingIndex, hamming_distance, l2_normalise, pack_bits


def test_pack_codes_bit_layout():
    bits = np.array([[1, 0, 0, 0, 0, 0, 0, 1, 1, 1]], np.uint8)
    codes = pack_codes(bits)  # padded with zeros to 16 bits, MSB first
    assert codes.tolist() == [[0b10000001, 0b11000000]]
    assert pack_bits(np.ones((2, 8))).tolist() == [[255], [255]]
    with pytest.raises(CbirError):
        pack_bits(np.ones((1, 7)))


def test_mean_hash_is_the_seed_recipe():
    x = np.array([[0.0, 1.0, -1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    s = 1 / (1 + np.exp(-x[0]))
    assert mean_hash(x)[0].tolist() == (s > s.mean()).astype(int).tolist() == [0, 1, 0, 1]
    assert mean_hash(x)[1].tolist() == [0, 0, 0, 0]  # nothing above the mean


def test_hamming_order_equals_brute_force():
    rng = np.random.default_rng(0)
    g = pack_codes(rng.integers(0, 2, (300, 64)).astype(np.uint8))
    q = pack_codes(rng.integers(0, 2, (7, 64)).astype(np.uint8))
    idx = HammingIndex(64)
    idx.add(g)
    sims, ids = idx.search(q, 300)
    d = hamming_distance(q, g)
    for i in range(7):
        # distances along the ranking are non-decreasing and equal the brute-force ones
        dist_ranked = d[i, ids[i]]
        assert (np.diff(dist_ranked) >= 0).all()
        np.testing.assert_allclose(sims[i], 1 - dist_ranked / 64)
        assert sorted(dist_ranked.tolist()) == sorted(d[i].tolist())


def test_cosine_order_and_leave_one_out():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 16)).astype(np.float32)
    idx = CosineIndex(16)
    idx.add(x)
    xn = l2_normalise(x)
    s, i = idx.search(x[:5], 4, exclude=np.arange(5))
    brute = xn[:5] @ xn.T
    for r in range(5):
        brute[r, r] = -np.inf
        assert i[r].tolist() == np.argsort(-brute[r])[:4].tolist()
        assert r not in i[r]
    np.testing.assert_allclose(s[:, 0], np.sort(brute, 1)[:, -1], rtol=1e-5)


def test_search_returns_minus_one_beyond_the_gallery():
    idx = CosineIndex(4)
    idx.add(np.eye(4, dtype=np.float32)[:3])
    s, i = idx.search(np.eye(4, dtype=np.float32)[:1], 10, exclude=np.array([0]))
    assert i.shape == (1, 3) and i[0, -1] == -1 and set(i[0, :2]) == {1, 2}


def test_persistence_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    a = CosineIndex(8)
    a.add(x)
    a.save(tmp_path / "c.faiss")
    b = CosineIndex.load(tmp_path / "c.faiss")
    np.testing.assert_array_equal(a.search(x, 5)[1], b.search(x, 5)[1])
    codes = pack_codes(mean_hash(x))
    h = HammingIndex(8)
    h.add(codes)
    h.save(tmp_path / "h.faiss")
    assert HammingIndex.load(tmp_path / "h.faiss").search(codes, 3)[1].tolist() == h.search(codes, 3)[1].tolist()


def test_hnsw_finds_the_exact_neighbours_on_a_small_set():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 32)).astype(np.float32)
    flat, hnsw = CosineIndex(32), CosineIndex(32, ann="hnsw")
    flat.add(x)
    hnsw.add(x)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(flat.search(x[:50], 10)[1], hnsw.search(x[:50], 10)[1])])
    assert recall > 0.95


def test_mismatches_and_zero_vectors():
    idx = CosineIndex(8)
    with pytest.raises(IndexMismatch, match="dimension 8"):
        idx.add(np.ones((2, 5), np.float32))
    with pytest.raises(CbirError, match="zero or non-finite norm"):
        idx.add(np.zeros((2, 8), np.float32))
    h = HammingIndex(16)
    with pytest.raises(IndexMismatch, match="16 bits"):
        h.add(np.zeros((1, 1), np.uint8))
    with pytest.raises(IndexMismatch, match="16-bit codes"):
        h.search(np.zeros((1, 16), np.float32), 1)
