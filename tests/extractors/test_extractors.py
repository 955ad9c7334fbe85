"""Global extractors: shapes, normalisation, invariants of each recipe, state round trips."""

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.extractors import configure, make_extractor
from cbir.vectors import l2n

from helpers import assert_close_rel, assert_close_scaled, assert_unit_rows, rel_diff, textured


@pytest.fixture(scope="module")
def images():
    return [textured(s, 120, 160) for s in range(4)] + [textured(9, 96, 96)]


def test_colour_histogram_is_hellinger_normalised(images):
    ext = make_extractor("colour")
    x = ext.extract(images)
    assert x.shape == (5, 256)
    assert_unit_rows(x, "colour")
    # square-rooted histogram: squares of the (L2-normalised) entries sum to one and are proportional to counts
    assert (x >= 0).all()
    g = make_extractor("colour", {"grid": 2})
    assert g.extract(images[:1]).shape == (1, 1024)


@pytest.mark.parametrize("backbone", ["xfeat", "aliked-t16"])
def test_pooled_descriptor_layout(images, backbone):
    ext = make_extractor("pooled", {"backbone": backbone})
    x = ext.extract(images)
    assert x.shape == (5, ext.dim) and x.dtype == np.float32
    assert_unit_rows(x, f"pooled {backbone}")
    # batch composition does not matter: other batch, other padding of the batch, float32 reordering only
    assert_close_rel(ext.extract(images[:2]), x[:2], 1e-5, f"pooled {backbone}: a batch of 2 vs of 5", axis=1)
    assert list(ext.weights().values())[0] and len(list(ext.weights().values())[0]) == 64  # sha256 recorded


def test_pooled_options_change_the_descriptor(images):
    base = make_extractor("pooled", {"backbone": "xfeat"}).extract(images[:2])
    gap = make_extractor("pooled", {"backbone": "xfeat", "pool": "gap"}).extract(images[:2])
    ms = make_extractor("pooled", {"backbone": "xfeat", "scales": [1.0, 0.707]}).extract(images[:2])
    assert rel_diff(gap, base, axis=1).min() > 1e-2 and rel_diff(ms, base, axis=1).min() > 1e-2  # far above float noise
    assert_unit_rows(ms, "multi-scale")
    with pytest.raises(CbirError, match="no stage"):
        make_extractor("pooled", {"backbone": "xfeat", "stages": ["nope"]}).dim
    with pytest.raises(CbirError, match="unknown backbone"):
        make_extractor("pooled", {"backbone": "vgg99"}).dim


def test_torchvision_style_backbone_needs_weights():
    with pytest.raises(CbirError, match="needs ImageNet weights"):
        make_extractor("pooled", {"backbone": "resnet50"}).dim


def test_vlad_codebook_and_aggregation(images):
    ext = make_extractor("vlad", {"local": "rootsift", "k": 8, "fit_images": 5})
    assert ext.needs_fit
    ext.fit(iter(images), n=len(images))
    assert ext.centroids.shape == (8, 128)
    x = ext.describe(images)
    assert x.shape == (5, 8 * 128)
    assert_unit_rows(x, "vlad")
    # the codebook is the state: a fresh extractor loaded with it describes identically
    other = make_extractor("vlad", {"local": "rootsift", "k": 8, "fit_images": 5})
    other.load_state(ext.state())
    assert_close_rel(other.describe(images[:2]), x[:2], 1e-6, "vlad with the loaded codebook", axis=1)  # same arithmetic
    # an image without local features aggregates to zeros (the engine reports it as a failure)
    assert not ext.aggregate(np.zeros((0, 128), np.float32)).any()


def test_fused_cosine_is_weighted_mean_of_parts(images):
    parts = [{"name": "colour", "conf": {}, "weight": 3.0}, {"name": "colour", "conf": {"bins": [8, 3, 3]}, "weight": 1.0}]
    f = make_extractor("fused", {"parts": parts})
    x = f.describe(images[:3])
    a = make_extractor("colour").describe(images[:3])
    b = make_extractor("colour", {"bins": [8, 3, 3]}).describe(images[:3])
    expect = (3 * (a[0] @ a[1]) + 1 * (b[0] @ b[1])) / 4
    assert_close_scaled(x[0] @ x[1], expect, 1e-5, "fused cosine", scale=1.0)  # a cosine: its scale is 1


def test_configure_puts_options_where_they_belong():
    name, conf = configure("hash", backbone="xfeat", base="pooled")
    assert conf == {"base": "pooled", "base_conf": {"backbone": "xfeat"}}
    name, conf = configure(None, backbone="aliked-t16")  # the default extractor (pooled) takes the backbone itself
    assert name == "pooled" and conf == {"backbone": "aliked-t16"}
    name, conf = configure("fused", backbone="aliked-t16")
    assert name == "fused" and conf["parts"][0]["conf"]["backbone"] == "aliked-t16"
    with pytest.raises(CbirError, match="needs --head"):
        configure("semantic")
    with pytest.raises(CbirError, match="unknown extractor"):
        configure("nope")


def test_semantic_head_round_trip(tmp_path, images):
    from cbir.extractors.semantic import fit_head, head_logits, load_head, save_head

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(loc=c, scale=0.3, size=(20, 6)) for c in (-2, 0, 2)]).astype(np.float32)
    y = [str(c) for c in (0, 1, 2) for _ in range(20)]
    head = fit_head(X, y, epochs=200)
    assert head["train_accuracy"] == 1.0
    head["base"] = {"name": "colour", "conf": {}, "weights": {}}
    save_head(head, tmp_path / "h.h5")
    back = load_head(tmp_path / "h.h5")
    assert_close_rel(head_logits(back, X), head_logits(head, X), 1e-6, "logits of the reloaded head", axis=1)  # same float32 weights
    assert back["classes"] == ["0", "1", "2"]
    with pytest.raises(CbirError, match="not found"):
        load_head(tmp_path / "none.h5")


def test_semantic_extractor_gives_probabilities(tmp_path, images):
    from cbir.extractors.semantic import fit_head, save_head

    col = make_extractor("colour")
    X = col.describe(images)
    head = fit_head(np.concatenate([X, X]), ["a", "b", "a", "b", "c"] * 2, epochs=100)
    head["base"] = {"name": "colour", "conf": col.conf, "weights": {}}
    save_head(head, tmp_path / "h.h5")
    sem = make_extractor("semantic", {"head": str(tmp_path / "h.h5")})
    p = sem.describe(images)
    assert p.shape == (5, 3) and (p >= 0).all()
    assert_close_scaled(p.sum(1), np.ones(5), 1e-5, "probabilities sum to 1")
    assert sem.identity()["conf"]["head"] == "@head" and "head" in sem.weights()


def test_hash_codes_are_centred_mean_hash(images):
    h = make_extractor("hash", {"base": "colour", "base_conf": {}})
    raw = h.extract(images)
    h.fit_post(raw)
    final = h.post(raw)
    codes = h.encode(final)
    assert codes.shape == (5, 32) and codes.dtype == np.uint8
    from cbir.extractors.hashing import mean_hash, pack_codes

    np.testing.assert_array_equal(codes, pack_codes(mean_hash(final - final.mean(0))))
    seed = make_extractor("hash", {"base": "colour", "base_conf": {}, "project": "none"})
    np.testing.assert_array_equal(seed.encode(l2n(raw)), pack_codes(mean_hash(l2n(raw))))


@pytest.fixture()
def mnv2_weights(tmp_path, monkeypatch):
    """Random MobileNetV2 weights (features only) found as the carried file in $CBIR_WEIGHTS: no wheel needed."""
    import torch

    from cbir.models.mobilenetv2 import MobileNetV2

    torch.manual_seed(0)
    torch.save(MobileNetV2(num_classes=0).state_dict(), tmp_path / "mobilenetv2_bottleneck_wts.pt")
    monkeypatch.setenv("CBIR_WEIGHTS", str(tmp_path))
    return tmp_path / "mobilenetv2_bottleneck_wts.pt"


def test_defaults_are_built_on_imagenet_mobilenet_v2(images, mnv2_weights):
    from cbir.extractors import DEFAULT_EXTRACTOR, HEAD_BASE_PARTS
    from cbir.extractors.fused import DEFAULT_PARTS
    from cbir.weights import cached_sha256

    p = make_extractor("pooled")
    # the backbone's preferred options: the last block (1280-d), average-pooled
    assert p.conf["backbone"] == "mobilenet_v2" and p.stages == ["last"] and p.conf["pool"] == "gap" and p.dim == 1280
    assert p.weights() == {"mobilenetv2_bottleneck_wts.pt": cached_sha256(mnv2_weights)}
    # options given explicitly win; an index conf from before (stages null, gem) keeps its meaning
    old = make_extractor("pooled", {"backbone": "mobilenet_v2", "stages": None, "pool": "gem"})
    assert old.stages == ["stage13", "last"] and old.dim == 96 + 1280
    assert make_extractor("pooled", {"pool": "gem"}).conf["pool"] == "gem"
    assert make_extractor("pooled", {"backbone": "xfeat"}).conf["pool"] == "gem"  # other backbones: unchanged

    assert DEFAULT_EXTRACTOR == "pooled"  # chosen by benchmarks/suite.py (README "Defaults")
    assert [(q["name"], q["conf"].get("backbone"), q["weight"]) for q in DEFAULT_PARTS] == [
        ("pooled", "mobilenet_v2", 1.0), ("colour", None, 0.1)]
    f = make_extractor("fused")
    assert not f.needs_fit and f.dim == 1280 + 256
    # the fused conf (what an index records) carries the options the backbone filled in; DEFAULT_PARTS is untouched
    assert f.conf["parts"][0]["conf"] == {"backbone": "mobilenet_v2", "stages": ["last"], "pool": "gap"}
    assert DEFAULT_PARTS[0]["conf"] == {"backbone": "mobilenet_v2"}
    x = f.describe(images[:3])
    a, c = p.describe(images[:3]), make_extractor("colour").describe(images[:3])
    assert x[0] @ x[1] == pytest.approx((a[0] @ a[1] + 0.1 * (c[0] @ c[1])) / 1.1, abs=1e-5)

    h = make_extractor("hash")
    assert h.conf["base"] == "fused" and h.conf["base_conf"]["parts"] == f.conf["parts"]
    assert make_extractor("hash", {"base": "pooled"}).conf["base_conf"] == {"stages": ["last"], "pool": "gap"}

    assert [q["name"] for q in HEAD_BASE_PARTS][0] == "pooled" and HEAD_BASE_PARTS[0]["conf"]["backbone"] == "mobilenet_v2"
