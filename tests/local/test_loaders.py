"""Weight loaders: random state dicts saved in the official key layouts load strictly; wrong files name the keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir.errors import CbirError
from cbir.local import build_extractor, build_matcher

# the official superpoint_v1.pth: 12 convolutions, weight + bias each
SUPERPOINT_KEYS = [
    f"{n}.{p}"
    for n in ("conv1a", "conv1b", "conv2a", "conv2b", "conv3a", "conv3b", "conv4a", "conv4b", "convPa", "convPb", "convDa", "convDb")
    for p in ("weight", "bias")
]
SUPERPOINT_SHAPES = {"conv1a.weight": (64, 1, 3, 3), "convPb.weight": (65, 256, 1, 1), "convDb.weight": (256, 256, 1, 1), "convDa.weight": (256, 128, 3, 3)}


def official_superpoint_state(seed=0):
    """Random tensors under the official names and shapes (written out, not taken from our module)."""
    g = torch.Generator().manual_seed(seed)
    chans = {"conv1a": (64, 1), "conv1b": (64, 64), "conv2a": (64, 64), "conv2b": (64, 64), "conv3a": (128, 64), "conv3b": (128, 128),
             "conv4a": (128, 128), "conv4b": (128, 128), "convPa": (256, 128), "convPb": (65, 256), "convDa": (256, 128), "convDb": (256, 256)}
    state = {}
    for name, (cout, cin) in chans.items():
        k = 1 if name in ("convPb", "convDb") else 3
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5
        state[f"{name}.bias"] = torch.zeros(cout)
    return state


def official_superglue_state(seed=0):
    """Random tensors under the names and shapes of superglue_indoor.pth / superglue_outdoor.pth."""
    g = torch.Generator().manual_seed(seed)
    state = {}

    def conv(prefix, cout, cin):
        state[f"{prefix}.weight"] = torch.randn(cout, cin, 1, generator=g) / cin**0.5
        state[f"{prefix}.bias"] = torch.zeros(cout)

    def bn(prefix, c):
        state[f"{prefix}.weight"] = torch.ones(c)
        state[f"{prefix}.bias"] = torch.zeros(c)
        state[f"{prefix}.running_mean"] = torch.zeros(c)
        state[f"{prefix}.running_var"] = torch.ones(c)
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    chans = [3, 32, 64, 128, 256, 256]
    for i in range(5):
        conv(f"kenc.encoder.{3 * i}", chans[i + 1], chans[i])
        if i < 4:
            bn(f"kenc.encoder.{3 * i + 1}", chans[i + 1])
    for layer in range(18):
        p = f"gnn.layers.{layer}"
        conv(f"{p}.attn.merge", 256, 256)
        for j in range(3):
            conv(f"{p}.attn.proj.{j}", 256, 256)
        conv(f"{p}.mlp.0", 512, 512)
        bn(f"{p}.mlp.1", 512)
        conv(f"{p}.mlp.3", 256, 512)
    conv("final_proj", 256, 256)
    state["bin_score"] = torch.tensor(1.0)
    return state


def test_superpoint_official_layout_loads_strictly(tmp_path):
    from cbir.models.superpoint import SuperPoint, load_superpoint

    assert sorted(SuperPoint().state_dict()) == sorted(SUPERPOINT_KEYS)
    for k, shape in SUPERPOINT_SHAPES.items():
        assert tuple(SuperPoint().state_dict()[k].shape) == shape
    path = tmp_path / "superpoint_v1.pth"
    torch.save(official_superpoint_state(), path)
    net = load_superpoint(path)
    assert not net.training
    torch.testing.assert_close(net.convDb.weight, official_superpoint_state()["convDb.weight"])


def test_superpoint_truncated_file_names_missing_keys(tmp_path):
    state = official_superpoint_state()
    del state["convDb.weight"], state["convDb.bias"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "sp_bad.pth"
    torch.save(state, path)
    with pytest.raises(CbirError) as e:
        build_extractor("superpoint", weights=str(path))
    msg = str(e.value)
    assert "convDb.weight" in msg and "extra.weight" in msg and "sp_bad.pth" in msg


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"conv1a.weight": np.zeros(3, dtype=object)}, path)  # needs pickled numpy objects
    with pytest.raises(CbirError, match="refused"):
        build_extractor("superpoint", weights=str(path))


def test_superglue_official_layout_loads_strictly(tmp_path):
    from cbir.models.superglue import SuperGlue, load_superglue

    official = official_superglue_state()
    assert sorted(SuperGlue().state_dict()) == sorted(official)
    assert len(official) == 339
    path = tmp_path / "superglue_indoor.pth"
    torch.save(official, path)
    net = load_superglue(path, "indoor")
    assert not net.training
    torch.testing.assert_close(net.gnn.layers[17].mlp[3].weight, official["gnn.layers.17.mlp.3.weight"])


def test_superglue_wrong_file_names_keys(tmp_path):
    path = tmp_path / "superglue_outdoor.pth"
    torch.save(official_superpoint_state(), path)  # a SuperPoint file given as SuperGlue weights
    with pytest.raises(CbirError) as e:
        build_matcher("superglue", features="superpoint", weights=str(path))
    assert "missing keys" in str(e.value) and "kenc.encoder.0.weight" in str(e.value) and "conv1a.weight" in str(e.value)


def test_superpoint_superglue_matcher_runs(tmp_path, warped_pair):
    sp, sg = tmp_path / "sp.pth", tmp_path / "sg.pth"
    torch.save(official_superpoint_state(), sp)
    torch.save(official_superglue_state(), sg)
    ext = build_extractor("superpoint", weights=str(sp), max_keypoints=256)
    m = build_matcher("superglue", features="superpoint", weights=str(sg), sinkhorn_iterations=20, match_threshold=0.0)
    img0, img1, _ = warped_pair
    f0, f1 = ext.extract(img0), ext.extract(img1)
    out = m.match(f0, f1)
    assert out["matches"].dtype == np.int64 and out["matches"].shape[1] == 2
    assert out["scores"].shape == (len(out["matches"]),)
    if len(out["matches"]):
        assert out["matches"][:, 0].max() < len(f0["keypoints"]) and out["matches"][:, 1].max() < len(f1["keypoints"])
        assert len(set(out["matches"][:, 1])) == len(out["matches"])  # one-to-one


def test_loftr_ckpt_loads_strictly(tmp_path):
    import kornia.feature as KF

    from cbir.local.loftr import build_loftr

    ref = KF.LoFTR(pretrained=None).state_dict()
    for k in ("backbone.conv1.weight", "backbone.layer2_outconv2.0.weight", "loftr_coarse.layers.0.q_proj.weight", "fine_preprocess.down_proj.weight"):
        assert k in ref  # the names of the official checkpoints (under 'matcher.')
    torch.manual_seed(0)
    ckpt = {"state_dict": {f"matcher.{k}": torch.randn_like(v.float()).to(v.dtype) for k, v in ref.items()}, "epoch": 29}
    path = tmp_path / "outdoor_ds.ckpt"
    torch.save(ckpt, path)
    net, p = build_loftr(str(path))
    assert not net.training and p == path
    torch.testing.assert_close(net.backbone.conv1.weight, ckpt["state_dict"]["matcher.backbone.conv1.weight"])
    m = build_matcher("loftr", weights=str(path))
    img = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    out = m.match(img, img)
    assert set(out) == {"keypoints0", "keypoints1", "scores"}
    assert out["keypoints0"].shape == out["keypoints1"].shape and out["keypoints0"].dtype == np.float32
    many = m.match_many(img, [img, img[:80, :112]])
    assert len(many) == 2 and many[0]["keypoints0"].shape == out["keypoints0"].shape


def test_loftr_wrong_ckpt_names_missing_keys(tmp_path):
    state = official_superpoint_state()
    path = tmp_path / "loftr_outdoor.ckpt"
    torch.save({"state_dict": {f"matcher.{k}": v for k, v in state.items()}}, path)
    with pytest.raises(CbirError) as e:
        build_matcher("loftr", weights=str(path))
    assert "backbone.conv1.weight" in str(e.value) and "conv1a.weight" in str(e.value)


def test_loftr_without_weights_names_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CBIR_WEIGHTS", str(tmp_path))
    with pytest.raises(CbirError, match="loftr_outdoor.ckpt"):
        build_matcher("loftr")


def test_wheel_weights_load():
    """The carriers' files fit kornia's architectures (strictly, save the documented derived buffers)."""
    for f, m in (("aliked", "lightglue"), ("disk", "lightglue"), ("xfeat", "lighterglue")):
        ext = build_extractor(f)
        mat = build_matcher(m, features=f)
        assert ext.weights_path and mat.weights_path and not mat.net.training
