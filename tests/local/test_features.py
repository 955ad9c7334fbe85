"""Every offline extractor runs and returns hloc's layout with the documented dtypes."""

from __future__ import annotations

import numpy as np
import pytest

from cbir.errors import CbirError
from cbir.local import build_extractor, extractor_names

from helpers import assert_unit_rows

#: descriptors are L2-normalised in float32: a norm is 1 to ~sqrt(D) x 6e-8 (D = 128: 7e-7); measured <= 3.8e-7
#: (was atol 1e-3; an unnormalised descriptor is off by O(1))
UNIT_TOL = 1e-5

OFFLINE = {
    "sift": {},
    "rootsift": {},
    "aliked": {"max_keypoints": 512},
    "aliked-n16rot": {"max_keypoints": 512},
    "disk": {"max_keypoints": 512},
    "xfeat": {"max_keypoints": 512},
}


def check_layout(f, image, dim):
    h, w = image.shape[:2]
    assert set(f) >= {"keypoints", "descriptors", "scores", "image_size"}
    assert f["keypoints"].dtype == np.float32 and f["keypoints"].ndim == 2 and f["keypoints"].shape[1] == 2
    n = f["keypoints"].shape[0]
    assert n > 20
    assert f["descriptors"].dtype == np.float32 and f["descriptors"].shape == (n, dim)
    assert f["scores"].dtype == np.float32 and f["scores"].shape == (n,)
    assert f["image_size"].tolist() == [w, h]
    kp = f["keypoints"]
    assert (kp[:, 0] >= -0.5).all() and (kp[:, 0] <= w - 0.5).all()
    assert (kp[:, 1] >= -0.5).all() and (kp[:, 1] <= h - 0.5).all()
    assert_unit_rows(f["descriptors"], "descriptors", tol=UNIT_TOL)


def test_registry_lists_every_extractor():
    assert set(OFFLINE) | {"superpoint", "delf"} <= set(extractor_names())


@pytest.mark.parametrize("name", sorted(OFFLINE))
def test_extractor_layout(name, real_image):
    ext = build_extractor(name, **OFFLINE[name])
    f = ext.extract(real_image)
    check_layout(f, real_image, ext.descriptor_dim)
    if "max_keypoints" in OFFLINE[name]:
        assert len(f["keypoints"]) <= OFFLINE[name]["max_keypoints"]
    info = ext.info()
    assert info["name"] == name and info["descriptor_dim"] == ext.descriptor_dim


def test_extractor_accepts_grey_and_rejects_tiny(textured):
    ext = build_extractor("sift")
    grey = textured.mean(axis=2).astype(np.uint8)
    assert len(ext.extract(grey)["keypoints"]) > 20
    with pytest.raises(CbirError):
        ext.extract(np.zeros((4, 4, 3), np.uint8))


def test_unknown_option_and_name_fail_loudly():
    with pytest.raises(CbirError, match="unknown option"):
        build_extractor("sift", max_keypoint=10)
    with pytest.raises(CbirError, match="unknown local feature"):
        build_extractor("surf")


def test_flat_image_gives_empty_features():
    f = build_extractor("sift").extract(np.full((64, 64, 3), 128, np.uint8))
    assert f["keypoints"].shape == (0, 2) and f["descriptors"].shape == (0, 128) and f["scores"].shape == (0,)


def test_superpoint_with_user_weights(tmp_path, real_image):
    import torch

    from cbir.models.superpoint import SuperPoint

    torch.manual_seed(0)
    path = tmp_path / "superpoint_v1.pth"
    torch.save(SuperPoint().state_dict(), path)
    ext = build_extractor("superpoint", weights=str(path), max_keypoints=300)
    f = ext.extract(real_image)
    n = len(f["keypoints"])
    assert 0 < n <= 300
    assert f["descriptors"].shape == (n, 256) and f["descriptors"].dtype == np.float32
    assert (np.diff(f["scores"]) <= 1e-7).all()  # strongest first
    border = 4
    h, w = real_image.shape[:2]
    assert (f["keypoints"] >= border).all() and (f["keypoints"][:, 0] < w - border).all() and (f["keypoints"][:, 1] < h - border).all()


def test_superpoint_without_weights_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CBIR_WEIGHTS", str(tmp_path))
    with pytest.raises(CbirError, match="superpoint_v1.pth"):
        build_extractor("superpoint")


def test_delf_without_tensorflow_is_a_clear_error():
    from cbir.local.delf import DELF_RECIPE, tensorflow_available

    if tensorflow_available():  # pragma: no cover - not the case here
        pytest.skip("tensorflow is installed")
    with pytest.raises(CbirError, match="tensorflow") as e:
        build_extractor("delf")
    assert "kdtree" in str(e.value)  # points to the recipe usable without tensorflow
    assert DELF_RECIPE["matcher"] == "kdtree" and DELF_RECIPE["model"] == "affine"
