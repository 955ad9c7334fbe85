"""Learned PCA-whitening (cbir/extractors/whitening.py) and the ``whiten`` option of pooled and fused."""

import numpy as np
import pytest

from cbir.data import decode_image, read_file_list
from cbir.engine import STATE_FILE, Index, build_index, evaluate, load_state_file
from cbir.errors import CbirError
from cbir.extractors import make_extractor
from cbir.extractors.whitening import PCAWhitening, normalise_whiten

#: fused of the colour histogram alone: no network, so the index folder tests stay fast
COLOUR_ONLY = [{"name": "colour", "conf": {}, "weight": 1.0}]


def test_normalise_whiten_forms_and_errors():
    assert normalise_whiten(None) is None and normalise_whiten(0) is None
    assert normalise_whiten(256) == {"dim": 256, "power": 0.5}
    assert normalise_whiten({"dim": None, "power": 1}) == {"dim": None, "power": 1.0}
    for bad in ({"dim": 0}, {"dim": 2.5}, {"power": 2}, {"dims": 8}, "pca"):
        with pytest.raises(CbirError):
            normalise_whiten(bad)


@pytest.mark.parametrize("power", [0.5, 1.0])
def test_pca_whitening_scales_by_eigenvalue_power(power):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(200, 6)) * [5, 3, 2, 1, 0.5, 0.1]) @ np.linalg.qr(rng.normal(size=(6, 6)))[0]
    w = PCAWhitening({"dim": 4, "power": power})
    w.fit(x)
    assert w.proj.shape == (6, 4) and w.out_dim(6) == 4
    z = (x - w.mean) @ w.proj  # before the final L2: variance of each kept direction = eig^(1 - power)
    eig = np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1][:4]
    np.testing.assert_allclose(z.var(0, ddof=1), eig ** (1 - power), rtol=1e-3)
    out = w.apply(x)
    assert out.shape == (200, 4) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_pca_whitening_is_capped_by_the_gallery_rank():
    x = np.random.default_rng(1).normal(size=(10, 32))
    w = PCAWhitening({"dim": 128, "power": 0.5})
    assert w.out_dim(32) == 32  # before fitting: what was asked, capped by the input
    w.fit(x)
    assert w.out_dim(32) == 9  # 10 centred rows span 9 directions
    with pytest.raises(CbirError):
        w.apply(np.zeros((1, 31), np.float32))


def test_unset_whiten_keeps_the_identity_of_before():
    for name in ("pooled", "fused"):
        e = make_extractor(name)
        assert "whiten" not in e.identity()["conf"] and not e.needs_post_fit
    assert make_extractor("fused").key() != make_extractor("fused", {"whiten": 64}).key()


def test_whitened_fused_index_round_trip(small_set, tmp_path):
    entries = read_file_list(small_set / "list.txt")
    out = tmp_path / "idx"
    rep = build_index(entries, out, extractor="fused", conf={"parts": COLOUR_ONLY, "whiten": {"dim": 5}}, progress=False)
    m = rep.manifest
    assert m["dim"] == 5 and m["extractor"]["conf"]["whiten"] == {"dim": 5, "power": 0.5}
    state = load_state_file(out / STATE_FILE)
    assert state["whiten/proj"].shape == (256, 5) and state["whiten/mean"].shape == (256,)

    idx = Index(out)
    np.testing.assert_allclose(np.linalg.norm(idx.descriptors, axis=1), 1.0, atol=1e-5)
    ext = idx.extractor  # re-made from the manifest + extractor.h5
    assert ext.dim == 5
    np.testing.assert_array_equal(ext.state()["whiten/proj"], state["whiten/proj"])
    # a query is described exactly as the gallery was
    for i in (0, 7):
        img = decode_image(entries[i].path, max_side=ext.max_side)
        np.testing.assert_allclose(idx.describe_images([img])[0][0], idx.descriptors[i], atol=1e-5)
    res = idx.query_images([entries[3].path], top_k=3)
    assert res[0]["results"][0]["name"] == entries[3].name
    assert evaluate(idx, progress=False)["metrics"]["map"] > 0

    # a whitened index without its learned state does not open silently
    wrong = make_extractor("fused", {"parts": COLOUR_ONLY})
    with pytest.raises(CbirError):
        wrong.load_state(state)


def test_whitened_pooled_post_and_state(small_set):
    entries = read_file_list(small_set / "list.txt")
    e = make_extractor("pooled", {"max_side": 64, "whiten": {"dim": 8, "power": 0.5}})
    assert e.needs_post_fit and e.raw_dim == 1280 and e.dim == 8
    imgs = [decode_image(x.path, max_side=64) for x in entries]
    raw = e.extract(imgs)
    assert raw.shape == (12, 1280)
    e.fit_post(raw)
    final = e.post(raw)
    assert final.shape == (12, 8)
    np.testing.assert_allclose(np.linalg.norm(final, axis=1), 1.0, atol=1e-5)
    again = make_extractor("pooled", e.conf)
    again.load_state(e.state())
    np.testing.assert_allclose(again.describe(imgs[:2]), final[:2], atol=1e-5)
