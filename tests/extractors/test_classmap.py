"""Dense class maps (seed 004): a semantic head applied at every location, upsampled, used for weighted pooling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import assert_close_rel, assert_close_scaled, textured

from cbir.errors import CbirError
from cbir.extractors import HEAD_BASE_PARTS
from cbir.extractors.base import make_extractor
from cbir.extractors.classmap import ClassMapper, class_map, class_scores
from cbir.extractors.semantic import fit_head, head_logits, save_head
from cbir.extractors.upsample import argmax_upsample, prune_classes, upsample_bilinear, upsample_memory_bytes

GIB = 1 << 30
#: class logits computed two ways (the head on a pooled vector / as 1x1 convolutions on the grid): max |a - b| within
#: this fraction of the largest logit (these toy heads' logits reach ~5e3, so an absolute 1e-3 was nearly used up by
#: float32 rounding: 7.3e-4 measured). Measured <= 7.6e-7 of the largest; a wrong window, stride or part order: O(1).
LOGITS_REL = 1e-5


def _head(base_name: str, base_conf: dict, labels, n_img: int = 6, hidden: int = 0):
    base = make_extractor(base_name, base_conf)
    imgs = [textured(10 + i, 100, 130) for i in range(n_img)]
    head = fit_head(base.describe(imgs), [labels[i % len(labels)] for i in range(n_img)], epochs=30, hidden=hidden)
    head["base"] = {"name": base.name, "conf": base.conf}
    head["label_names"] = {}
    return head, base


@pytest.fixture(scope="module")
def fused_head(tmp_path_factory):
    head, base = _head("fused", {"parts": HEAD_BASE_PARTS}, ["a", "b", "c"])
    path = tmp_path_factory.mktemp("head") / "fused.h5"
    save_head(head, path)
    return head, base, str(path)


@pytest.fixture(scope="module")
def mapper(fused_head):
    return ClassMapper(fused_head[2])


def test_classmap_whole_image_window_equals_global_head_output(fused_head, mapper):
    head, base, path = fused_head
    sem = make_extractor("semantic", {"head": path})
    for img in (textured(1, 100, 130), textured(2, 70, 200)):
        scores, stride = class_scores(mapper, img, window=None)
        gh, gw = -(-img.shape[0] // 32), -(-img.shape[1] // 32)
        assert scores.shape == (3, gh, gw) and stride == 32.0
        glob = sem.logits([img])[0]
        # logits relative to their largest: the head as 1x1 convolutions over the grid vs on the pooled vector
        assert_close_scaled(scores, np.broadcast_to(glob[:, None, None], scores.shape), LOGITS_REL, "whole-image window vs global head")
        assert_close_scaled(mapper.global_logits(img), head_logits(head, base.describe([img]))[0], LOGITS_REL, "global logits")


def test_classmap_mlp_head_runs_as_1x1_convolutions():
    head, base = _head("colour", {}, ["a", "b", "c"], hidden=8)
    img = textured(3, 100, 130)
    scores, _ = class_scores(head, img, window=None)
    assert_close_scaled(scores[:, 0, 0], head_logits(head, base.describe([img]))[0], LOGITS_REL, "MLP head as 1x1 convolutions")


def test_classmap_constant_image_every_location_scores_like_the_image():
    # colour-only head: a cell of a constant image has the image's histogram, so every location
    # (any window) gets exactly the global head output. (A CNN part does not: zero padding makes the
    # border features differ from the interior's, and the global GeM includes them.)
    head, base = _head("colour", {}, ["a", "b"])
    const = np.full((100, 130, 3), (30, 140, 200), np.uint8)
    glob = head_logits(head, base.describe([const]))[0]
    for window in (1, 3, None):
        scores, stride = class_scores(head, const, window=window)
        assert scores.shape == (2, 4, 5) and stride == 32.0
        assert_close_scaled(scores, np.broadcast_to(glob[:, None, None], scores.shape), LOGITS_REL, f"constant image, window {window}")


def test_classmap_shapes_crop_and_agreement_with_full_upsampling(mapper):
    img = textured(4, 100, 130)
    labels, conf, info = mapper.class_map(img)
    assert labels.shape == conf.shape == (100, 130)
    assert labels.dtype == np.int64 and conf.dtype == np.float32
    assert labels.min() >= 0 and labels.max() < mapper.num_classes
    assert 0 < conf.min() and conf.max() <= 1 + 1e-5
    assert info["grid"] == [4, 5] and info["stride"] == 32.0 and info["upsampling"] == "direct"
    # same as upsampling every class's probability map with the transposed convolution
    scores, _ = mapper.scores(img)
    p = torch.softmax(torch.from_numpy(scores), 0)
    up = upsample_bilinear(p.unsqueeze(0), 32)[0, :, :100, :130]
    ones = upsample_bilinear(torch.ones(1, 1, 4, 5), 32)[0, 0, :100, :130]
    ref_conf, ref_labels = (up / ones).max(0)
    np.testing.assert_array_equal(labels, ref_labels.numpy())
    assert_close_scaled(conf, ref_conf.numpy(), 1e-5, "confidence vs full upsampling", scale=1.0)  # probabilities: scale 1
    # the module-level function returns the same
    l2, c2 = class_map(mapper, img)
    np.testing.assert_array_equal(l2, labels)


def test_classmap_large_images_are_analysed_at_the_heads_size(mapper):
    # 1024x768 -> analysed at 512x384: stride 64 px of the input, upsampled directly
    big = np.ascontiguousarray(np.kron(textured(5, 96, 128), np.ones((8, 6, 1), np.uint8)))
    labels, conf, info = mapper.class_map(big)
    assert labels.shape == (768, 768) and info["analysed_size"] == [512, 512] and info["stride"] == 48.0
    img = np.ascontiguousarray(np.kron(textured(6, 110, 60), np.ones((10, 10, 1), np.uint8)))  # 1100x600
    labels, conf, info = mapper.class_map(img)
    assert labels.shape == conf.shape == (1100, 600)
    assert info["upsampling"] == "analysed+resize" and info["analysed_size"] == [512, 279]
    scores, stride = mapper.scores(img)
    assert scores.shape == (3, 16, 9) and stride == pytest.approx(32 * 1100 / 512)
    # --full-res: every part sees the image as given (seed 004), one cell per 32 px of the input
    scores, stride = mapper.scores(img[:600], analyse=False)
    assert scores.shape == (3, 19, 19) and stride == 32.0
    labels, _, info = mapper.class_map(img[:600], analyse=False)
    assert labels.shape == (600, 600) and info["grid"] == [19, 19] and info["analysed_size"] == [600, 600]
    assert 0 <= info["global"]["id"] < 3


@pytest.mark.parametrize("seed", range(6))
def test_classmap_prune_classes_is_exact(seed):
    g = torch.Generator().manual_seed(seed)
    K, h, w = [(7, 1, 1), (12, 1, 5), (40, 6, 9), (300, 5, 4), (64, 8, 8), (25, 3, 7)][seed]
    s = torch.randn(K, h, w, generator=g, dtype=torch.float64) * (1 + seed)
    if seed % 2:  # regions won by a few classes, plus exact ties
        s[seed % K] += 6.0 * (torch.arange(w, dtype=torch.float64) < w / 2)
        s[(seed + 1) % K] = s[seed % K]
    p = torch.softmax(s, 0)
    kept = prune_classes(p)
    for f in (2, 3, 8):
        up = upsample_bilinear(p.unsqueeze(0), f)[0]
        ref_conf, ref_labels = up.max(0)
        assert set(torch.unique(ref_labels).tolist()) <= set(kept.tolist())
        labels, conf = argmax_upsample(s, f, chunk=5, border="zero")
        assert torch.equal(labels, ref_labels)
        torch.testing.assert_close(conf, ref_conf)


def test_classmap_prune_keeps_few_classes_of_a_structured_map():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1000, 16, 16, generator=g)
    region = (torch.arange(16)[:, None] // 8) * 2 + (torch.arange(16)[None] // 8)  # 4 quadrants
    s[region * 100, torch.arange(16)[:, None], torch.arange(16)[None]] += 8.0
    kept = prune_classes(torch.softmax(s, 0))
    assert kept.tolist() == [0, 100, 200, 300]


def test_segment_memory_bound_logic(monkeypatch):
    # K=1000 at 2048x2048: the chunked upsampling stays well under 2 GiB, the naive one needs ~16 GiB
    assert upsample_memory_bytes(1000, 2048, 2048, chunk=32) < 2 * GIB
    assert upsample_memory_bytes(1000, 2048, 2048, chunk=None) > 15 * GIB
    from cbir.extractors import upsample

    seen = []
    real = upsample.upsample_padded
    monkeypatch.setattr(upsample, "upsample_padded", lambda x, f: (seen.append(x.shape[0]), real(x, f))[1])
    s = torch.randn(100, 4, 4)
    argmax_upsample(s, 8, chunk=16, prune=False)
    assert max(seen) <= 16 and sum(seen) == 100 + 1  # every class once, 16 at a time (+1: the border gain)
    seen.clear()
    s[7] += 20.0  # one class wins everywhere: only it is upsampled
    argmax_upsample(s, 8, chunk=16)
    assert seen == [1, 1]


def test_weighting_option_validation(fused_head, tmp_path):
    path = fused_head[2]
    with pytest.raises(CbirError, match="mode"):
        make_extractor("pooled", {"weighting": {"head": path, "mode": "bogus"}})
    with pytest.raises(CbirError, match="needs a head"):
        make_extractor("pooled", {"weighting": "predicted"})
    with pytest.raises(CbirError, match="not found"):
        make_extractor("pooled", {"weighting": {"head": str(tmp_path / "nope.h5")}})
    with pytest.raises(CbirError, match="background"):
        make_extractor("pooled", {"weighting": {"head": path, "mode": "nonbackground"}})
    with pytest.raises(CbirError, match="window"):
        make_extractor("pooled", {"weighting": {"head": path, "window": 2}})
    # unweighted: the identity of before the option existed (index keys unchanged)
    assert "weighting" not in make_extractor("pooled", {}).identity()["conf"]


def test_weighting_nonbackground_mode(tmp_path):
    head, _ = _head("fused", {"parts": HEAD_BASE_PARTS}, ["background", "thing"])
    save_head(head, tmp_path / "bg.h5")
    imgs = [textured(20, 100, 130), textured(21, 100, 130)]
    ext = make_extractor("pooled", {"weighting": {"head": str(tmp_path / "bg.h5"), "mode": "nonbackground"}})
    assert ext.conf["weighting"] == {"mode": "nonbackground", "window": 1, "background": "background"}
    d = ext.extract(imgs)
    assert d.shape == (2, ext.dim) and np.isfinite(d).all()
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)


def test_segment_weighted_pooled_index_records_the_head(fused_head, small_set, tmp_path):
    from cbir.cli import main
    from cbir.data import decode_image, read_file_list
    from cbir.engine import build_index, load_index

    path = fused_head[2]
    entries = read_file_list(small_set / "list.txt")
    conf = {"weighting": {"head": path, "mode": "predicted"}}
    rep = build_index(entries, tmp_path / "w", extractor="pooled", conf=conf, progress=False, workers=1)
    m = rep.manifest["extractor"]
    assert m["conf"]["weighting"] == {"mode": "predicted", "window": 1}
    assert m["conf"]["weighting_head"] == "@weighting_head"
    assert "weighting_head" in m["weights"] and (tmp_path / "w" / "weighting_head.h5").is_file()
    plain = build_index(entries, tmp_path / "p", extractor="pooled", progress=False, workers=1)
    assert plain.manifest["extractor"]["key"] != m["key"]
    idx_w, idx_p = load_index(tmp_path / "w"), load_index(tmp_path / "p")
    cos = (idx_w.descriptors * idx_p.descriptors).sum(1)
    # weighting changes the descriptors where the map is not uniform (this toy head is confident almost everywhere)
    assert cos.min() < 0.999 and (cos < 1 - 1e-4).sum() >= 6
    # a query is described exactly as the gallery was: through the index's own copy of the head
    ext = idx_w.extractor
    assert ext.conf["weighting_head"] == str(tmp_path / "w" / "weighting_head.h5")
    img = decode_image(entries[0].path, max_side=ext.max_side)
    # the same image through the same head: batch-of-one vs the build's batches, float32 reordering only
    assert_close_rel(ext.describe([img])[0], idx_w.descriptors[idx_w.row(entries[0].name)], 1e-5, "query vs its gallery row")
    # cbir segment --index uses that copy too
    out = tmp_path / "seg.png"
    assert main(["segment", str(entries[0].path), "--index", str(tmp_path / "w"), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    assert out.is_file() and out.stat().st_size > 0
    assert main(["segment", str(entries[0].path), "--index", str(tmp_path / "p"), "--json", "--quiet"]) == 2


def test_segment_cli_writes_png_and_prints_fractions(fused_head, tmp_path, capsys):
    from PIL import Image

    from cbir.cli import main

    img_path = tmp_path / "img.png"
    Image.fromarray(textured(7, 150, 200)).save(img_path)
    out = tmp_path / "classes.png"
    assert main(["segment", str(img_path), "--head", fused_head[2], "--out", str(out), "--json", "--quiet", "--threads", "1"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert rep["size"] == [150, 200] and rep["grid"] == [5, 7] and rep["figure"] == str(out)
    assert abs(sum(r["fraction"] for r in rep["classes"]) - 1) < 1e-3
    assert {r["label"] for r in rep["classes"]} <= {"a", "b", "c"} and rep["predicted"]["label"] in {"a", "b", "c"}
    assert main(["segment", str(img_path), "--head", fused_head[2], "--window", "global", "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert len(rep["classes"]) == 1 and rep["classes"][0]["label"] == rep["predicted"]["label"]
    assert main(["segment", str(img_path), "--head", fused_head[2], "--quiet"]) == 2  # neither --out nor --json
