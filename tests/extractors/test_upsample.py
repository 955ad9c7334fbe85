from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.transform import rescale

from helpers import assert_close_rel

from cbir.extractors.upsample import (
    BilinearUpsample,
    bilinear_kernel_size,
    bilinear_weights,
    upsample_bilinear,
    upsample_class_scores,
    upsample_filt,
)

FACTORS = range(2, 10)


def _skimage_upsample(img: np.ndarray, factor: int, clip: bool = True) -> np.ndarray:
    # the seed's reference call, plus channel_axis for H x W x C input
    return rescale(img, factor, order=1, mode="constant", cval=0, channel_axis=-1, anti_aliasing=False, clip=clip)


def _torch_upsample(module: torch.nn.Module, img: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        return module(x)[0].permute(1, 2, 0).numpy()


def test_bilinear_kernel_size_formula():
    assert [bilinear_kernel_size(f) for f in FACTORS] == [4, 5, 8, 9, 12, 13, 16, 17]
    assert bilinear_kernel_size(1) == 1
    with pytest.raises(ValueError):
        bilinear_kernel_size(0)


def test_upsample_filt_hand_values():
    t4 = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(upsample_filt(4), np.outer(t4, t4))
    t5 = np.array([1, 2, 3, 2, 1]) / 3
    np.testing.assert_allclose(upsample_filt(5), np.outer(t5, t5))
    t3 = np.array([0.5, 1.0, 0.5])
    np.testing.assert_allclose(upsample_filt(3), np.outer(t3, t3))
    assert upsample_filt(1).tolist() == [[1.0]]


def test_bilinear_weights_diagonal_layout():
    w = bilinear_weights(3, 4)
    assert w.shape == (4, 4, 5, 5) and w.dtype == np.float32
    for i in range(4):
        for j in range(4):
            expected = upsample_filt(5) if i == j else np.zeros((5, 5))
            np.testing.assert_allclose(w[i, j], expected, rtol=1e-6)


@pytest.mark.parametrize("channels", [3, 5])
@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "full"])
def test_bilinear_upsample_matches_skimage(channels: int, depthwise: bool):
    rng = np.random.default_rng(channels)
    img = rng.random((7, 11, channels))  # non-square, strictly positive
    signed = img - 0.5  # range contains cval=0, so skimage's default clip is a no-op
    for factor in FACTORS:
        up = BilinearUpsample(channels, factor, depthwise=depthwise, dtype=torch.float64)
        ours = _torch_upsample(up, img)
        assert ours.shape == (7 * factor, 11 * factor, channels)
        assert np.allclose(ours, _skimage_upsample(img, factor, clip=False)), factor
        assert np.allclose(_torch_upsample(up, signed), _skimage_upsample(signed, factor)), factor


def test_bilinear_upsample_seed_ramp_default_skimage_call():
    # the seed's own test image and call (anti_aliasing/clip left at their defaults)
    x, y = np.ogrid[:3, :3]
    img = np.repeat((x + y)[..., None], 3, 2) / 6.0
    for factor in FACTORS:
        ref = rescale(img, factor, order=1, mode="constant", cval=0, channel_axis=-1)
        assert np.allclose(_torch_upsample(BilinearUpsample(3, factor, dtype=torch.float64), img), ref)


def test_upsample_bilinear_functional_and_variants_agree():
    x = torch.randn(2, 4, 5, 6)
    for factor in (1, 2, 3):
        ref = upsample_bilinear(x, factor)
        assert ref.shape == (2, 4, 5 * factor, 6 * factor)
        with torch.no_grad():
            full = BilinearUpsample(4, factor, depthwise=False)(x)
            dw = BilinearUpsample(4, factor)(x)
            unbatched = BilinearUpsample(4, factor)(x[0])
        # float32, one transposed convolution three ways (full / depthwise / unbatched): a few reordered float32 sums (measured <= 4.2e-8)
        assert_close_rel(full, ref, 1e-6, f"full conv x{factor}")
        assert_close_rel(dw, ref, 1e-6, f"depthwise x{factor}")
        assert_close_rel(unbatched, ref[0], 1e-6, f"unbatched x{factor}")
    assert BilinearUpsample(4, 3, depthwise=False).weight.shape == (4, 4, 5, 5)
    assert BilinearUpsample(4, 3).weight.shape == (4, 1, 5, 5)


@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "full"])
def test_bilinear_upsample_learnable_and_frozen(depthwise: bool):
    up = BilinearUpsample(3, 2, depthwise=depthwise)
    assert up.weight.requires_grad
    up(torch.randn(1, 3, 4, 4)).square().sum().backward()
    assert up.weight.grad is not None and up.weight.grad.abs().sum() > 0

    frozen = BilinearUpsample(3, 2, depthwise=depthwise, learnable=False)
    assert not frozen.weight.requires_grad
    assert not any(p.requires_grad for p in frozen.parameters())
    x = torch.randn(1, 3, 4, 4, requires_grad=True)
    frozen(x).sum().backward()
    assert frozen.weight.grad is None and x.grad is not None


def _full_argmax(scores: torch.Tensor, factor: int, softmax: bool = False):
    if softmax:
        scores = torch.softmax(scores, dim=0)
    up = upsample_bilinear(scores.unsqueeze(0), factor)[0]
    conf, labels = up.max(dim=0)
    return labels, conf


def test_upsample_class_scores_chunked_matches_full_argmax():
    torch.manual_seed(0)
    scores = torch.randn(1, 23, 6, 9, dtype=torch.float64)
    ref_labels, ref_conf = _full_argmax(scores[0], 4)
    for chunk in (1, 5, 23, 64):
        labels, conf = upsample_class_scores(scores, 4, chunk=chunk)
        assert labels.dtype == torch.int64 and labels.shape == (24, 36)
        assert torch.equal(labels, ref_labels)
        torch.testing.assert_close(conf, ref_conf)
    # (K, h, w) input is accepted too
    labels, _ = upsample_class_scores(scores[0], 4, chunk=7)
    assert torch.equal(labels, ref_labels)


def test_upsample_class_scores_crop():
    torch.manual_seed(1)
    scores = torch.randn(11, 8, 7, dtype=torch.float64)
    factor = 3
    ref_labels, ref_conf = _full_argmax(scores, factor)
    for out_size in [(22, 19), (20, 15), (24, 21), (1, 1), (5, 21)]:
        labels, conf = upsample_class_scores(scores, factor, out_size=out_size, chunk=4)
        assert labels.shape == out_size
        assert torch.equal(labels, ref_labels[: out_size[0], : out_size[1]])
        torch.testing.assert_close(conf, ref_conf[: out_size[0], : out_size[1]])
    with pytest.raises(ValueError):
        upsample_class_scores(scores, factor, out_size=(25, 10))


def test_upsample_class_scores_softmax():
    torch.manual_seed(2)
    scores = 3 * torch.randn(1, 10, 5, 5, dtype=torch.float64)
    labels, conf = upsample_class_scores(scores, 2, out_size=(9, 10), chunk=3, softmax=True)
    ref_labels, ref_conf = _full_argmax(scores[0], 2, softmax=True)
    assert torch.equal(labels, ref_labels[:9])
    torch.testing.assert_close(conf, ref_conf[:9])
    # upsampled probabilities: in [0, 1]; interior pixels are convex mixes of
    # coarse probabilities, so the winner has at least 1/K
    assert conf.min() >= 0 and conf.max() <= 1
    assert conf[1:-1, 1:-1].min() >= 1 / 10 - 1e-12


def test_upsample_class_scores_ties_pick_lowest_class():
    scores = torch.zeros(6, 2, 2)
    scores[[2, 4]] = 1.0
    labels, conf = upsample_class_scores(scores, 2, chunk=3)
    assert torch.equal(labels, torch.full((4, 4), 2))


def testupsample_padded_interpolate_path_matches_transposed_conv():
    # upsample_class_scores upsamples chunks with zero-padded F.interpolate
    from cbir.extractors.upsample import upsample_padded

    x = torch.randn(3, 5, 7, dtype=torch.float64)
    for factor in range(1, 10):
        framed = upsample_padded(x, factor)
        assert framed.shape == (3, 7 * factor, 9 * factor)
        torch.testing.assert_close(framed[:, factor:-factor, factor:-factor], upsample_bilinear(x, factor))
