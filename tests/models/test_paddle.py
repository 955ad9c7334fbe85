"""Paddle backbones (seed 003): cbir's features of a Paddle MobileNetV2 equal the seed's own Paddle code.

A random-initialised paddle.vision MobileNetV2 (12 classes, BN statistics randomised so every layer
matters) is saved both ways the seed uses (``.pdparams`` state dict, ``paddle.jit.save``); cbir's
``semantic``, ``pooled`` and ``hash`` features are compared with the seed's recipe run by Paddle image by
image (cv2 resize to 227x227 on BGR, BGR->RGB, ToTensor, ImageNet Normalize), on real images from
../shared/data when present and on synthetic ones otherwise.
"""

import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

paddle = pytest.importorskip("paddle")

from cbir.errors import CbirError  # noqa: E402

from helpers import REPO, SHARED_DATA, assert_close_rel, rel_diff, textured  # noqa: E402

BOOFCV = SHARED_DATA / "instance_boofcv_scene24"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


# ------------------------------------------------------------------------------------------- fixtures


def _random_mobilenet(num_classes=12, seed=0):
    """A random MobileNetV2 whose features depend on the image: random BN affine and classifier, BN
    statistics calibrated on synthetic images (a deep random net with unit statistics maps every image
    to nearly the same vector)."""
    from paddle.vision.models import mobilenet_v2

    paddle.seed(seed)
    rng = np.random.default_rng(seed)
    m = mobilenet_v2(num_classes=num_classes)
    new = {}
    for k, v in m.state_dict().items():
        a = v.numpy()
        if k.endswith(".weight") and a.ndim == 1:  # BN scale
            a = rng.uniform(0.5, 1.5, a.shape)
        elif k.endswith(".bias"):
            a = rng.normal(0, 0.1, a.shape)
        elif k == "classifier.1.weight":
            a = rng.normal(0, 0.1, a.shape)
        new[k] = a.astype(np.float32)
    m.set_state_dict(new)
    for layer in m.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            layer._momentum = 0.0  # running statistics := those of the calibration batch
    x = np.stack([textured(100 + i, 227, 227) for i in range(8)]).astype(np.float32).transpose(0, 3, 1, 2) / 255
    x = (x - np.float32(MEAN)[:, None, None]) / np.float32(STD)[:, None, None]
    m.train()
    with paddle.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "When training, we now always track global mean and variance"
        m(paddle.to_tensor(x))
    m.eval()
    return m


@pytest.fixture(scope="module")
def paddle_model(tmp_path_factory):
    """(model, pdparams path, jit prefix) of a random 12-class MobileNetV2, saved as the seed's users save it."""
    d = tmp_path_factory.mktemp("paddle_model")
    m = _random_mobilenet()
    pdparams = d / "zodiac_mobilenetv2.pdparams"
    paddle.save(m.state_dict(), str(pdparams))
    prefix = d / "jit" / "zodiac_mobilenetv2_final"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paddle.jit.save(m, str(prefix), input_spec=[paddle.static.InputSpec([None, 3, 227, 227], "float32")])
    return m, pdparams, prefix


@pytest.fixture(scope="module")
def images():
    """RGB uint8 images as cbir decodes them: 8 BoofCV photos when ../shared/data is here, else synthetic ones."""
    if BOOFCV.is_dir():
        from cbir.data import decode_image

        paths = sorted((BOOFCV / "images").glob("*.jpg"))[::3]
        return [decode_image(p) for p in paths]
    return [textured(i, 240 + 16 * i, 320 - 8 * i) for i in range(6)]


def _seed_preprocess(rgb):
    """seed 003's SimplePreprocessing on the image cv2.imread would give (BGR)."""
    import cv2
    import paddle.vision.transforms as T

    transform = T.Compose([T.ToTensor(), T.Normalize(mean=MEAN, std=STD)])
    image = np.ascontiguousarray(rgb[..., ::-1])  # cv2.imread order
    image = cv2.resize(image, (227, 227))
    image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    image = transform(image)
    return paddle.unsqueeze(image, axis=0)


class _SeedPooled(paddle.vision.models.MobileNetV2):
    """The seed's mobilenetv2.py with ``x = self.classifier(x)`` commented out."""

    def forward(self, x):
        x = self.features(x)
        if self.with_pool:
            x = self.pool2d_avg(x)
        if self.num_classes > 0:
            x = paddle.flatten(x, 1)
            # x = self.classifier(x)
        return x


def _seed_pooled(pdparams, images):
    model = _SeedPooled(num_classes=1280)
    with warnings.catch_warnings():  # "Skip loading for classifier.1.weight", as in the seed
        warnings.simplefilter("ignore")
        model.load_dict(paddle.load(str(pdparams)))
    model.eval()
    with paddle.no_grad():
        return np.concatenate([model(_seed_preprocess(im)).numpy() for im in images])


def _seed_softmax(prefix, images):
    import paddle.nn.functional as F

    model = paddle.jit.load(str(prefix))
    with paddle.no_grad():
        return np.concatenate([F.softmax(model(_seed_preprocess(im))).numpy() for im in images])


def _l2n(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


#: cbir's features of a Paddle model against the seed's code run by Paddle itself: the same float32 kernels, batched
#: against one image at a time. Relative to each vector's norm (descriptors are unit, softmax rows sum to 1). Measured
#: at 1 and 2 threads: pooled <= 5.8e-7, softmax <= 3.4e-6 (softmax scales the logits' error by the logits); bugs land
#: far above (other mean/std or input size: > 1e-2, see test_paddle_backbone_options_and_size).
SAME_PADDLE_REL = 5e-5
#: Paddle against cbir's torch MobileNetV2 with the converted weights: two frameworks' float32 kernels. Measured at 1
#: and 2 threads: pooled <= 9.7e-6 (torch_parity's max-abs / max-magnitude 1.6e-5), softmax <= 1.5e-5, logits 7.1e-6.
TORCH_PADDLE_REL = 2e-4


# ------------------------------------------------------------------------------------------- features


def test_paddle_pooled_equals_seed_adaptive_avg_pool(paddle_model, images):
    from cbir.extractors import make_extractor

    _, pdparams, prefix = paddle_model
    ref = _seed_pooled(pdparams, images)
    assert ref.shape == (len(images), 1280)
    cos = _l2n(ref) @ _l2n(ref).T
    assert cos[~np.eye(len(images), dtype=bool)].max() < 0.995  # the features tell the images apart
    for backbone, weights in (("paddle:mobilenet_v2", str(pdparams)), (f"paddle-jit:{prefix}", None)):
        ext = make_extractor("pooled", {"backbone": backbone, "weights": weights})
        assert ext.conf["pool"] == "gap" and ext.conf["max_side"] is None  # the seed's defaults
        got = ext.describe(images)  # one batched call
        assert got.shape == (len(images), 1280) and ext.dim == 1280
        assert_close_rel(got, _l2n(ref), SAME_PADDLE_REL, f"pooled {backbone} vs the seed", axis=1)


def test_paddle_semantic_equals_seed_softmax(paddle_model, images):
    from cbir.extractors import configure, make_extractor

    _, pdparams, prefix = paddle_model
    ref = _seed_softmax(prefix, images)
    assert ref.shape == (len(images), 12) and ref.max() > 0.2 and np.abs(ref[1:] - ref[:1]).max() > 0.01  # informative
    for backbone, weights in ((f"paddle-jit:{prefix}", None), ("paddle:mobilenet_v2", str(pdparams))):
        name, conf = configure("semantic", backbone=backbone, weights=weights)
        ext = make_extractor(name, conf)
        got = ext.describe(images)
        assert ext.dim == 12 and ext.classes[:2] == ["0", "1"]
        assert_close_rel(got, ref, SAME_PADDLE_REL, f"semantic {backbone} vs the seed's softmax", axis=1)


def test_paddle_hash_codes_equal_mean_hash_of_paddle_features(paddle_model, images):
    from cbir.extractors import configure, make_extractor
    from cbir.extractors.hashing import mean_hash, pack_codes

    _, pdparams, _ = paddle_model
    name, conf = configure("hash", backbone="paddle:mobilenet_v2", weights=str(pdparams), base="pooled", extra={"project": "none"})
    ext = make_extractor(name, conf)
    codes = ext.encode(ext.describe(images))
    ref = _seed_pooled(pdparams, images)
    assert codes.shape == (len(images), 1280 // 8)
    np.testing.assert_array_equal(codes, pack_codes(mean_hash(_l2n(ref))))
    # the seed's Hashing() on the unnormalised pooled vector thresholds sigmoid at another scale: most bits agree
    seed_bits = mean_hash(ref)
    agree = (np.unpackbits(codes, axis=1) == seed_bits).mean()
    assert agree > 0.8, agree


def test_paddle_converted_torch_model_matches(paddle_model, images, tmp_path):
    import torch

    from cbir.extractors import make_extractor
    from cbir.models.mobilenetv2 import MobileNetV2
    from cbir.models.paddle import paddle_to_torch_state, torch_parity
    from cbir.cli.paddle import register  # noqa: F401  (the CLI module imports without side effects)
    from cbir.weights import load_state_dict

    _, pdparams, prefix = paddle_model
    state, info = paddle_to_torch_state(pdparams)
    assert info["num_classes"] == 12 and "features.0.1.running_mean" in state and state["classifier.1.weight"].shape == (12, 1280)
    par = torch_parity(pdparams, state, images)
    # torch_parity: max |torch - paddle| / max |paddle|, i.e. relative to the magnitude of the features / logits
    assert par["pooled_max_rel"] < TORCH_PADDLE_REL and par["logits_max_rel"] < TORCH_PADDLE_REL, par
    # a jit prefix converts to the same tensors
    state_jit, _ = paddle_to_torch_state(prefix)
    assert all(torch.equal(state[k], state_jit[k]) for k in state)
    # the file cbir writes loads with weights_only=True into cbir's MobileNetV2, strictly
    out = tmp_path / "m.pth"
    torch.save(state, out)
    MobileNetV2(num_classes=12).load_state_dict(load_state_dict(out))
    # and --backbone mobilenet_v2 with the seed's preprocessing gives the Paddle backbone's features
    seed_conf = {"pool": "gap", "stages": ["last"], "input_size": [227, 227], "max_side": None}
    t = make_extractor("pooled", {"backbone": "mobilenet_v2", "weights": str(out), **seed_conf}).describe(images)
    p = make_extractor("pooled", {"backbone": "paddle:mobilenet_v2", "weights": str(pdparams)}).describe(images)
    assert_close_rel(t, p, TORCH_PADDLE_REL, "pooled: torch mobilenet_v2 vs paddle", axis=1)
    ts = make_extractor("semantic", {"backbone": "mobilenet_v2", "weights": str(out), "input_size": [227, 227]}).describe(images)
    ps = make_extractor("semantic", {"backbone": f"paddle-jit:{prefix}"}).describe(images)
    assert_close_rel(ts, ps, TORCH_PADDLE_REL, "semantic: torch mobilenet_v2 vs paddle", axis=1)


# ------------------------------------------------------------------------------------------- CLI


def _labelled_list(tmp_path, small_set):
    """24 BoofCV images (8 scenes x 3) when ../shared/data is here, else the 12 synthetic images of small_set."""
    if BOOFCV.is_dir():
        lines = []
        for row in (BOOFCV / "gt.csv").read_text().splitlines()[1:]:
            path, label = row.split(",")
            lines.append(f"{BOOFCV / path}\tscene{label}")
        lst = tmp_path / "boofcv24.txt"
        lst.write_text("\n".join(lines) + "\n")
        return lst, 24
    return small_set / "list.txt", 12


def test_paddle_cli_index_build_and_eval_three_kinds(paddle_model, tmp_path, small_set, capsys):
    from cbir.cli import main

    _, pdparams, prefix = paddle_model
    lst, n = _labelled_list(tmp_path, small_set)
    kinds = {
        "pooled": ["--extractor", "pooled", "--backbone", "paddle:mobilenet_v2", "--weights", str(pdparams)],
        "semantic": ["--extractor", "semantic", "--backbone", f"paddle-jit:{prefix}"],
        "hash": ["--extractor", "hash", "--base", "pooled", "--backbone", "paddle:mobilenet_v2", "--weights", str(pdparams)],
    }
    dims = {"pooled": 1280, "semantic": 12, "hash": 1280}
    for kind, args in kinds.items():
        idx = tmp_path / f"idx-{kind}"
        assert main(["index", "build", "--list", str(lst), *args, "--out", str(idx), "--quiet", "--json", "--threads", "2"]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["images"] == n and summary["failed"] == 0 and summary["dim"] == dims[kind], summary
        report = tmp_path / f"{kind}.json"
        assert main(["eval", "--index", str(idx), "--queries", str(lst), "--json", str(report), "--quiet", "--threads", "2"]) == 0
        rep = json.loads(report.read_text())
        assert rep["n_queries"] == n and 0.0 <= rep["metrics"]["map"] <= 1.0
        assert "precision@1" in rep["metrics"] or any(k.startswith("precision") for k in rep["metrics"]), rep["metrics"]
        capsys.readouterr()
    # the index records the Paddle weights by checksum (queries with other weights are refused)
    from cbir.index.store import read_manifest
    from cbir.weights import cached_sha256

    m = read_manifest(tmp_path / "idx-pooled")
    assert cached_sha256(pdparams) in m["extractor"]["weights"].values()


def test_paddle_cli_convert_paddle_to_torch(paddle_model, tmp_path, capsys):
    from cbir.cli import main

    _, pdparams, _ = paddle_model
    out = tmp_path / "conv" / "model.pth"
    assert main(["convert", "paddle-to-torch", "--weights", str(pdparams), "--out", str(out), "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert out.is_file() and info["num_classes"] == 12
    assert info["parity"]["pooled_max_rel"] < TORCH_PADDLE_REL and info["parity"]["logits_max_rel"] < TORCH_PADDLE_REL, info["parity"]


# ------------------------------------------------------------------------------------------- errors


def test_paddle_missing_gives_clear_error(paddle_model, tmp_path, monkeypatch, capsys):
    import torch

    from cbir.cli import main
    from cbir.models.backbones import build_backbone

    _, pdparams, prefix = paddle_model
    monkeypatch.setitem(sys.modules, "paddle", None)  # `import paddle` now raises ImportError
    for name, w in (("paddle:mobilenet_v2", str(pdparams)), (f"paddle-jit:{prefix}", None)):
        with pytest.raises(CbirError, match=r"cbir\[paddle\]"):
            build_backbone(name, weights=w)
    assert main(["index", "build", "--list", str(tmp_path / "none.txt"), "--extractor", "pooled", "--backbone", "paddle:mobilenet_v2",
                 "--weights", str(pdparams), "--out", str(tmp_path / "i"), "--quiet"]) == 2
    capsys.readouterr()
    # converting a .pdparams needs no Paddle
    out = tmp_path / "m.pth"
    assert main(["convert", "paddle-to-torch", "--weights", str(pdparams), "--out", str(out), "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "parity" not in info and torch.load(out, weights_only=True)["classifier.1.weight"].shape == (12, 1280)


def test_paddle_pdparams_with_code_is_refused(tmp_path):
    from cbir.models.paddle import read_pdparams

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.pdparams"
    bad.write_bytes(pickle.dumps({"features.0.0.weight": Evil()}))
    with pytest.raises(CbirError, match="refused"):
        read_pdparams(bad)


def test_paddle_jit_of_other_network_semantic_only(tmp_path, images):
    """A jit classifier that is not a MobileNetV2: semantic works, pooled says it needs the state dict."""
    from cbir.extractors import make_extractor

    class Tiny(paddle.nn.Layer):
        def __init__(self):
            super().__init__()
            self.conv = paddle.nn.Conv2D(3, 8, 3, stride=4)
            self.fc = paddle.nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(paddle.flatten(paddle.nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))

    net = Tiny()
    net.eval()
    prefix = tmp_path / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paddle.jit.save(net, str(prefix), input_spec=[paddle.static.InputSpec([None, 3, 227, 227], "float32")])
    sem = make_extractor("semantic", {"backbone": f"paddle-jit:{prefix}"})
    assert sem.describe(images[:2]).shape == (2, 5)
    with pytest.raises(CbirError, match="pdparams"):
        make_extractor("pooled", {"backbone": f"paddle-jit:{prefix}"}).dim
    with pytest.raises(CbirError, match="only paddle:mobilenet_v2"):
        make_extractor("pooled", {"backbone": "paddle:resnet50", "weights": str(prefix) + ".pdiparams"}).dim


def test_paddle_backbone_options_and_size(paddle_model, images):
    from cbir.extractors import make_extractor

    _, pdparams, _ = paddle_model
    base = make_extractor("pooled", {"backbone": "paddle:mobilenet_v2", "weights": str(pdparams)})
    other = make_extractor("pooled", {"backbone": "paddle:mobilenet_v2", "weights": str(pdparams), "input_size": [160, 192],
                                      "backbone_conf": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}})
    assert base.key() != other.key()
    a, b = base.describe(images[:2]), other.describe(images[:2])
    # other options, other features: far above the float32 noise of SAME_PADDLE_REL
    assert a.shape == b.shape and rel_diff(b, a, axis=1).min() > 1e-2, rel_diff(b, a, axis=1)
    with pytest.raises(CbirError, match="unknown option"):
        make_extractor("pooled", {"backbone": "paddle:mobilenet_v2", "weights": str(pdparams), "backbone_conf": {"size": 3}}).dim


def test_paddle2_pdmodel_prefix_in_fresh_process(paddle_model, tmp_path):
    """A Paddle 2 style jit model (.pdmodel + .pdiparams, the seed's era) loads in a process where Paddle is not loaded yet."""
    _, pdparams, _ = paddle_model
    script = f"""
import os, sys, warnings, numpy as np
os.environ["FLAGS_enable_pir_api"] = "0"
import paddle
from paddle.vision.models import mobilenet_v2
m = mobilenet_v2(num_classes=12); m.set_state_dict(paddle.load({str(pdparams)!r})); m.eval()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    paddle.jit.save(m, {str(tmp_path / 'legacy' / 'model')!r}, input_spec=[paddle.static.InputSpec([None, 3, 227, 227], "float32")])
"""
    env = {**os.environ, "GLOG_minloglevel": "2"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "legacy" / "model.pdmodel").is_file()
    check = f"""
import sys, numpy as np, torch
torch.set_num_threads(2)
sys.path.insert(0, {str(REPO / 'tests')!r})
from helpers import textured
from cbir.extractors import make_extractor
imgs = [textured(i, 200, 260) for i in range(3)]
a = make_extractor("pooled", {{"backbone": "paddle-jit:{tmp_path / 'legacy' / 'model'}"}}).describe(imgs)
b = make_extractor("pooled", {{"backbone": "paddle:mobilenet_v2", "weights": {str(pdparams)!r}}}).describe(imgs)
s = make_extractor("semantic", {{"backbone": "paddle-jit:{tmp_path / 'legacy' / 'model'}"}}).describe(imgs)
rel = (np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max()  # the same Paddle kernels: SAME_PADDLE_REL
assert rel <= {SAME_PADDLE_REL!r} and s.shape == (3, 12), rel
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
