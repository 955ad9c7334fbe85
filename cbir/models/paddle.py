"""Paddle backbones (seed 003): models trained with PaddlePaddle, run by Paddle behind cbir's backbone interface.

* ``paddle:mobilenet_v2`` with ``--weights X.pdparams`` (a ``paddle.save(model.state_dict())`` of
  ``paddle.vision.models.mobilenet_v2``, the layout the seed's ``mobilenetv2.py`` copies): the last
  feature map (``last``: 1280 channels, what the seed's ``AdaptiveAvgPool2D`` pools; ``stage13``: 96) for
  ``pooled``/``hash``, and the classifier's logits for ``semantic`` when the state dict has one.
  ``--weights`` may also be a ``paddle.jit.save`` prefix (the seed loads its model both ways).
* ``paddle-jit:PREFIX``: a ``paddle.jit.save``d inference model (``PREFIX.json`` from Paddle 3, or
  ``PREFIX.pdmodel`` from Paddle 2), as ``paddle.jit.load`` takes it. Its program returns logits only:
  ``semantic`` uses them as they are; ``pooled`` maps the program's parameters onto paddle.vision's
  MobileNetV2 and uses that network only when its logits equal the program's on a probe image, else it
  says to pass the state dict.

Preprocessing is the seed's: images resized to 227x227 (cv2, bilinear; the extractor does it on the
uint8 images so every batch stacks), RGB, /255, ImageNet mean/std. Options (``backbone_conf``):
``mean``, ``std``; the extractors' ``input_size`` sets the size.

``.pdparams`` files are pickles: they are read with an unpickler that accepts only numpy arrays, dicts
and strings (a file that needs other code is refused), so reading one never runs code and needs no
Paddle: :func:`paddle_to_torch_state` converts one to cbir's torch MobileNetV2 (torchvision keys).

Paddle itself is imported only when a Paddle backbone is built (``pip install 'cbir[paddle]'``).
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import CbirError, WeightsNotFound
from ..weights import cached_sha256
from .backbones import BACKBONE_PREFIXES, IMAGENET_MEAN, IMAGENET_STD

INSTALL_HINT = "pip install 'cbir[paddle]' (CPU build: paddlepaddle; CUDA: paddlepaddle-gpu)"

#: the seed's input size (its args['input_size'] = [3, 227, 227])
SEED_INPUT_SIZE = (227, 227)

#: extractor options a Paddle backbone prefers where the user set none: the seed decodes images as
#: stored (then resizes them to 227x227) and average-pools the last map (AdaptiveAvgPool2D)
EXTRACTOR_DEFAULTS = {"pool": "gap", "max_side": None}

#: MobileNetV2 (width 1.0) stages offered as feature maps: name -> (index in ``features``, channels)
MOBILENET_STAGES = {"last": (18, 1280), "stage13": (13, 96)}


# ----------------------------------------------------------------------------------------- paddle import


def import_paddle():
    """``import paddle`` quietly, or a :class:`CbirError` naming the extra to install."""
    if "paddle" not in sys.modules:
        os.environ.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ info lines ("New Executor is Running")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "No ccache found" and friends at import
            import paddle
    except ImportError as e:
        raise CbirError(f"Paddle backbones need PaddlePaddle, which does not import here ({e}): {INSTALL_HINT}") from None
    return paddle


def _set_paddle_threads() -> None:
    """Paddle's CPU math threads follow torch's (set from --threads)."""
    try:
        import torch
        from paddle.base import core

        core.set_num_threads(max(1, torch.get_num_threads()))
    except (ImportError, AttributeError):  # pragma: no cover - older/other builds
        pass


# ----------------------------------------------------------------------------------------- .pdparams


class _ArraysOnly(pickle.Unpickler):
    """Unpickles what ``paddle.save(state_dict)`` writes (numpy arrays in dicts) and nothing else."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"), ("builtins", "tuple"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"needs {module}.{name}")
        if module.startswith("numpy") and module.endswith("multiarray"):
            for m in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 / numpy 1 names
                try:
                    return getattr(importlib.import_module(m), name)
                except ImportError:
                    continue
        return getattr(importlib.import_module(module), name)


def read_pdparams(path: os.PathLike) -> Dict[str, np.ndarray]:
    """A ``.pdparams`` state dict as ``{structured name: numpy array}``, without Paddle and without running code."""
    p = Path(path)
    if not p.is_file():
        raise WeightsNotFound(f"{p}: weight file not found")
    try:
        with open(p, "rb") as f:
            obj = _ArraysOnly(f).load()
    except pickle.UnpicklingError as e:
        raise CbirError(f"{p}: refused to load: not a plain Paddle state dict ({e}); cbir never unpickles code") from None
    except Exception as e:  # noqa: BLE001 - truncated / not a pickle
        raise CbirError(f"{p}: not a readable .pdparams file ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CbirError(f"{p}: expected a state dict, found {type(obj).__name__}")
    out: Dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or k.endswith("@@"):  # Paddle 2's StructuredToParameterName@@ and friends
            continue
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], np.ndarray):  # (name, array) of paddle.save(Tensor)
            v = v[1]
        if isinstance(v, np.ndarray):
            out[k] = v
    if not out:
        raise CbirError(f"{p}: holds no arrays (is it a Paddle state dict?)")
    return out


def jit_files(prefix: os.PathLike) -> Dict[str, Path]:
    """The files of a ``paddle.jit.save`` prefix: ``program`` (.json or .pdmodel) and ``params`` (.pdiparams)."""
    s = str(prefix)
    for suffix in (".json", ".pdmodel", ".pdiparams"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
    prog = next((Path(s + x) for x in (".json", ".pdmodel") if Path(s + x).is_file()), None)
    params = Path(s + ".pdiparams")
    if prog is None or not params.is_file():
        raise WeightsNotFound(
            f"{s}: not a paddle.jit.save prefix (expected {s}.json or {s}.pdmodel, and {s}.pdiparams); "
            "pass the prefix as paddle.jit.load takes it"
        )
    return {"program": prog, "params": params}


def _is_jit_prefix(path: os.PathLike) -> bool:
    try:
        jit_files(path)
        return True
    except WeightsNotFound:
        return False


def load_jit(prefix: os.PathLike):
    """``paddle.jit.load(prefix)`` in eval mode. A Paddle 2 program (``.pdmodel``) needs Paddle's old IR,
    which Paddle 3 selects only before it loads: cbir selects it when Paddle is not loaded yet."""
    files = jit_files(prefix)
    legacy = files["program"].suffix == ".pdmodel"
    if legacy and "paddle" not in sys.modules:
        os.environ["FLAGS_enable_pir_api"] = "0"
    paddle = import_paddle()
    if legacy:
        from paddle.base.framework import use_pir_api

        if use_pir_api():
            raise CbirError(
                f"{files['program']}: a Paddle 2 program (.pdmodel) loads only with Paddle's old IR; Paddle was "
                "already loaded with the new one in this process: run again with FLAGS_enable_pir_api=0 in the environment"
            )
    else:
        from paddle.base.framework import use_pir_api

        if not use_pir_api():
            raise CbirError(f"{files['program']}: a Paddle 3 program (.json) needs Paddle's new IR, but Paddle runs with the old one "
                            "(FLAGS_enable_pir_api=0, or a Paddle 2 .pdmodel loaded first in this process): use separate runs")
    s = str(files["program"])[: -len(files["program"].suffix)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = paddle.jit.load(s)
    except Exception as e:  # noqa: BLE001 - Paddle's own errors are long; keep the cause
        raise CbirError(f"{s}: paddle.jit.load failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    layer.eval()
    return layer, files


# ----------------------------------------------------------------------------------------- MobileNetV2


def mobilenet_classes(state: Dict[str, Any], where: str) -> int:
    """Classes of a paddle.vision MobileNetV2 state dict (0: no classifier); only width 1.0 is supported."""
    first = state.get("features.0.0.weight")
    last = state.get("features.18.0.weight")
    if first is None or last is None:
        sample = sorted(state)[:4]
        raise CbirError(
            f"{where}: not a paddle.vision MobileNetV2 state dict (no features.0.0.weight / features.18.0.weight; "
            f"keys start {sample}); PaddleClas model-zoo layouts are not supported, export with paddle.vision's MobileNetV2"
        )
    if tuple(first.shape)[0] != 32 or tuple(last.shape)[0] != 1280:
        raise CbirError(f"{where}: only MobileNetV2 at width 1.0 is supported (32 ... 1280 channels), this one has "
                        f"{tuple(first.shape)[0]} ... {tuple(last.shape)[0]}")
    w = state.get("classifier.1.weight")
    return 0 if w is None else int(tuple(w.shape)[1])  # Paddle's Linear weight is [in, out]


def build_paddle_mobilenet_v2(state: Dict[str, Any], where: str):
    """paddle.vision's MobileNetV2 with ``state`` loaded; every key and shape must fit (Paddle itself only warns)."""
    import_paddle()
    from paddle.vision.models import mobilenet_v2

    k = mobilenet_classes(state, where)
    model = mobilenet_v2(num_classes=k) if k else mobilenet_v2(num_classes=0)
    own = model.state_dict()
    missing = [n for n in own if n not in state]
    unexpected = [n for n in state if n not in own]
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(v.shape)}" for n, v in own.items() if n in state and tuple(state[n].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{what} {lst[:4]}{' ...' if len(lst) > 4 else ''}" for what, lst in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong)) if lst]
        raise CbirError(f"{where}: does not fit paddle.vision's MobileNetV2: " + "; ".join(parts))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_state_dict({n: np.asarray(v.numpy() if hasattr(v, "numpy") else v, dtype=np.float32) for n, v in state.items()})
    model.eval()
    return model


_PARAM_NAME = re.compile(r"^(?P<kind>[a-z0-9_]+?)_(?P<layer>\d+)\.(?P<wb>[wb])_(?P<n>\d+)(?:_(?P<m>\d+))?$")
_LAYER_KINDS = {"Conv2D": ("conv2d",), "BatchNorm2D": ("batch_norm2d", "batch_norm"), "Linear": ("linear",)}
#: parameter order per layer kind, as Paddle creates (and names) them: weights w_0, w_1 ..., then biases
_PARAM_ORDER = {"Conv2D": (["weight"], ["bias"]), "BatchNorm2D": (["weight", "_mean", "_variance"], ["bias"]), "Linear": (["weight"], ["bias"])}


def _state_from_program(layer, where: str) -> Dict[str, np.ndarray]:
    """The parameters of a translated (jit) program as a paddle.vision MobileNetV2 state dict.

    A saved program keeps Paddle's generated parameter names (``conv2d_51.w_0``, ``batch_norm2d_3.w_1`` =
    the running mean, ``linear_0.w_0``...), numbered in creation order; they are matched to the network's
    layers in that order. The caller checks the result against the program's own output.
    """
    import_paddle()
    from paddle.vision.models import mobilenet_v2

    groups: Dict[Tuple[str, int], List[Tuple[str, int, int, Any]]] = {}
    for p in layer.parameters():
        m = _PARAM_NAME.match(p.name)
        if m is None:
            raise CbirError(f"{where}: parameter {p.name!r} does not follow Paddle's layer naming")
        groups.setdefault((m["kind"], int(m["layer"])), []).append((m["wb"], int(m["n"]), int(m["m"] or 0), p))
    linear = [v for (kind, _), v in groups.items() if kind == "linear"]
    k = int(linear[0][0][3].shape[-1]) if len(linear) == 1 else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = mobilenet_v2(num_classes=k) if k else mobilenet_v2(num_classes=0)
    state: Dict[str, np.ndarray] = {}
    used = set()
    for lname, sub in ref.named_sublayers():
        kind = type(sub).__name__
        if kind not in _LAYER_KINDS:
            continue
        keys = sorted((key for key in groups if key[0] in _LAYER_KINDS[kind] and key not in used), key=lambda t: t[1])
        if not keys:
            raise CbirError(f"{where}: the program has fewer {kind} layers than MobileNetV2")
        key = keys[0]
        used.add(key)
        params = groups[key]
        ws = [q for wb, n, mm, q in sorted(params, key=lambda t: (t[1], t[2])) if wb == "w"]
        bs = [q for wb, n, mm, q in sorted(params, key=lambda t: (t[1], t[2])) if wb == "b"]
        wnames, bnames = _PARAM_ORDER[kind]
        if len(ws) != len(wnames) or len(bs) > len(bnames):
            raise CbirError(f"{where}: layer {key[0]}_{key[1]} has {len(ws)}+{len(bs)} parameters, {kind} {lname} needs {len(wnames)}+{len(bnames)}")
        for nm, q in list(zip(wnames, ws)) + list(zip(bnames, bs)):
            state[f"{lname}.{nm}"] = np.asarray(q.numpy(), np.float32)
    if len(used) != len(groups):
        raise CbirError(f"{where}: the program has {len(groups) - len(used)} more layers than MobileNetV2")
    return state


# ----------------------------------------------------------------------------------------- the backbone


class PaddleBackbone:
    """A Paddle network behind cbir's backbone interface.

    ``backbone(x)``: RGB float torch (B, 3, H, W) in [0, 1] -> ``{stage: torch map}`` (MobileNetV2's
    ``last`` 1280-channel map, pooled by the extractor as the seed's AdaptiveAvgPool2D does, and
    ``stage13``); ``classify(x)``: the classifier's outputs (B, num_classes). ``probabilities`` is true when
    the program already ends with a softmax. ``input_size`` (H, W) is the size images are resized to.
    """

    default_stages = ("last",)

    def __init__(self, name: str, weights_sha: Dict[str, str], model=None, program=None, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, input_size: Sequence[int] = SEED_INPUT_SIZE, no_maps_reason: str = "") -> None:
        import torch

        self.name = name
        self.weights_sha = dict(weights_sha)
        self.model = model  # eager paddle.vision MobileNetV2 (feature maps, and logits when it has a classifier)
        self.program = program  # translated jit program (logits), when given
        self.input_size = (int(input_size[0]), int(input_size[1]))
        if len(mean) != 3 or len(std) != 3 or min(float(s) for s in std) <= 0:
            raise CbirError(f"backbone {name!r}: mean and std need 3 values each (std > 0), got {list(mean)} / {list(std)}")
        self.mean = torch.tensor([float(m) for m in mean]).view(1, 3, 1, 1)
        self.std = torch.tensor([float(s) for s in std]).view(1, 3, 1, 1)
        self.stages: Tuple[str, ...] = tuple(MOBILENET_STAGES) if model is not None else ()
        self.channels: Dict[str, int] = {k: c for k, (_, c) in MOBILENET_STAGES.items()} if model is not None else {}
        self.no_maps_reason = no_maps_reason
        self.num_classes = 0
        if program is not None:
            self.num_classes = int(self._probe_outputs().shape[1])
        elif model is not None:
            self.num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.probabilities = False
        self._batch_ok = True
        if program is not None:
            out = self._probe_outputs()
            self.probabilities = bool(out.min() >= 0 and np.allclose(out.sum(1), 1.0, atol=1e-4))

    # -- plumbing
    def _to_paddle(self, x):
        import paddle

        x = (x.float() - self.mean) / self.std
        return paddle.to_tensor(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))

    def _probe(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        return rng.random((1, 3) + self.input_size, dtype=np.float32)

    def _probe_outputs(self) -> np.ndarray:
        if getattr(self, "_probe_out", None) is None:
            import paddle
            import torch

            with paddle.no_grad():
                self._probe_out = self.program(self._to_paddle(torch.from_numpy(self._probe()))).numpy()
        return self._probe_out

    def _run_program(self, t):
        """The jit program on a batch; a program saved for batch 1 runs image by image."""
        import paddle

        if self._batch_ok or t.shape[0] == 1:
            try:
                return self.program(t)
            except Exception:  # noqa: BLE001 - e.g. an input spec fixed to batch 1
                if t.shape[0] == 1:
                    raise
                self._batch_ok = False
        return paddle.concat([self.program(t[i : i + 1]) for i in range(t.shape[0])], 0)

    # -- the interface
    def __call__(self, x) -> Dict[str, Any]:
        import paddle
        import torch

        if self.model is None:
            raise CbirError(self.no_maps_reason or f"backbone {self.name!r} gives no feature maps")
        t = self._to_paddle(x)
        out = {}
        with paddle.no_grad():
            feats = self.model.features
            y = t
            for i in range(len(feats)):
                y = feats[i](y)
                if i == MOBILENET_STAGES["stage13"][0]:
                    out["stage13"] = torch.from_numpy(y.numpy())
            out["last"] = torch.from_numpy(y.numpy())
        return out

    forward = __call__

    def pooled(self, x):
        """The seed's 1280-d feature by construction: ``flatten(pool2d_avg(features(x)))`` of the Paddle model."""
        import paddle
        import torch

        if self.model is None:
            raise CbirError(self.no_maps_reason)
        with paddle.no_grad():
            return torch.from_numpy(paddle.flatten(self.model.pool2d_avg(self.model.features(self._to_paddle(x))), 1).numpy())

    def classify(self, x):
        """The classifier's outputs (B, num_classes) as a torch tensor: the jit program's, or the state dict's classifier."""
        import paddle
        import torch

        if not self.num_classes:
            raise CbirError(f"backbone {self.name!r} has no classifier (the state dict has no classifier.1.*)")
        t = self._to_paddle(x)
        with paddle.no_grad():
            if self.program is not None:
                y = self._run_program(t)
            else:
                m = self.model
                y = m.classifier(paddle.flatten(m.pool2d_avg(m.features(t)), 1))
        return torch.from_numpy(np.asarray(y.numpy(), np.float32))

    def eval(self):
        return self


def _options(opts: Dict[str, Any], name: str) -> Dict[str, Any]:
    unknown = sorted(set(opts) - {"mean", "std"})
    if unknown:
        raise CbirError(f"backbone {name!r}: unknown option(s) {unknown}; options: mean, std")
    return {"mean": opts.get("mean") or IMAGENET_MEAN, "std": opts.get("std") or IMAGENET_STD}


def _verified_model(program, state, where: str, input_size):
    """paddle.vision MobileNetV2 from ``state``, kept only if its logits equal the program's on a probe."""
    import paddle

    model = build_paddle_mobilenet_v2(state, where)
    probe = paddle.to_tensor(np.random.default_rng(1).standard_normal((1, 3) + tuple(input_size)).astype(np.float32))
    with paddle.no_grad():
        a = program(probe).numpy()
        m = model
        b = m.classifier(paddle.flatten(m.pool2d_avg(m.features(probe)), 1)).numpy() if getattr(m, "num_classes", 0) else None
    close = lambda u, v: u.shape == v.shape and np.abs(u - v).max() <= 1e-4 * max(1.0, float(np.abs(u).max()))  # noqa: E731
    if b is None or not (close(a, b) or close(a, _softmax(b))):  # a program may end with a softmax
        raise CbirError("the network rebuilt from the program's parameters does not reproduce its output")
    return model


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _from_jit(prefix: str, opts: Dict[str, Any], name: str, need_maps: bool = False) -> PaddleBackbone:
    program, files = load_jit(prefix)
    _set_paddle_threads()
    sha = {str(files["program"]): cached_sha256(files["program"]), str(files["params"]): cached_sha256(files["params"])}
    spec = None
    try:
        spec = tuple(program._input_spec()[0].shape)
    except Exception:  # noqa: BLE001 - no spec: use the seed's size
        pass
    fixed = spec is not None and len(spec) == 4 and all(isinstance(s, int) and s > 0 for s in spec[2:4])
    size = (int(spec[2]), int(spec[3])) if fixed else SEED_INPUT_SIZE  # a program saved for one size gets that size
    model, reason = None, ""
    try:
        model = _verified_model(program, _state_from_program(program, str(prefix)), str(prefix), size)
    except CbirError as e:
        reason = (f"{prefix}: pooled features need the layer before the classifier, which this jit program does not "
                  f"return, and it could not be rebuilt as paddle.vision's MobileNetV2 ({e}). Save the state dict too "
                  "(paddle.save(model.state_dict(), 'model.pdparams')) and use --backbone paddle:mobilenet_v2 --weights model.pdparams")
        if need_maps:
            raise CbirError(reason) from None
    return PaddleBackbone(name, sha, model=model, program=program, input_size=size, no_maps_reason=reason, **_options(opts, name))


def paddle_backbone(arch: str, weights=None, **opts) -> PaddleBackbone:
    """``paddle:mobilenet_v2`` with ``weights``: a ``.pdparams`` state dict or a ``paddle.jit.save`` prefix."""
    name = f"paddle:{arch}"
    if arch.lower().replace("-", "_") not in ("mobilenet_v2", "mobilenetv2"):
        raise CbirError(f"backbone {name!r}: only paddle:mobilenet_v2 is supported (paddle.vision's layout); "
                        "for another classifier use --backbone paddle-jit:PREFIX with --extractor semantic")
    if weights is None:
        raise CbirError(f"backbone {name!r} needs --weights: a .pdparams state dict (paddle.save(model.state_dict(), ...)) "
                        "or a paddle.jit.save prefix; cbir never downloads weights")
    if _is_jit_prefix(weights) and not str(weights).endswith(".pdparams"):
        return _from_jit(str(weights), opts, name, need_maps=True)
    state = read_pdparams(weights)
    import_paddle()
    _set_paddle_threads()
    model = build_paddle_mobilenet_v2(state, str(weights))
    return PaddleBackbone(name, {str(weights): cached_sha256(weights)}, model=model, **_options(opts, name))


def paddle_jit_backbone(prefix: str, weights=None, **opts) -> PaddleBackbone:
    """``paddle-jit:PREFIX``: a ``paddle.jit.save``d model; ``--weights`` does not apply."""
    name = f"paddle-jit:{prefix}"
    if not prefix:
        raise CbirError("backbone 'paddle-jit:' needs the model's path prefix, e.g. paddle-jit:models/zodiac (as paddle.jit.load takes it)")
    if weights is not None:
        raise CbirError(f"backbone {name!r} carries its own weights; drop --weights")
    return _from_jit(prefix, opts, name)


paddle_backbone.extractor_defaults = EXTRACTOR_DEFAULTS  # type: ignore[attr-defined]
paddle_jit_backbone.extractor_defaults = EXTRACTOR_DEFAULTS  # type: ignore[attr-defined]

for _prefix, _factory in (("paddle", paddle_backbone), ("paddle-jit", paddle_jit_backbone)):
    if _prefix not in BACKBONE_PREFIXES:
        BACKBONE_PREFIXES.register(_prefix)(_factory)


# ----------------------------------------------------------------------------------------- conversion


def paddle_to_torch_state(weights: os.PathLike) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A paddle.vision MobileNetV2 (``.pdparams``, or a jit prefix with Paddle installed) as the state dict of
    cbir's torch MobileNetV2 (torchvision keys): BN ``_mean/_variance`` -> ``running_mean/running_var`` (+
    ``num_batches_tracked``), Linear weights [in, out] -> [out, in]. Returns (state, info)."""
    import torch

    from .mobilenetv2 import MobileNetV2

    where = str(weights)
    if _is_jit_prefix(weights) and not str(weights).endswith(".pdparams"):
        program, _ = load_jit(weights)
        try:
            state_np = _state_from_program(program, where)
            _verified_model(program, state_np, where, SEED_INPUT_SIZE)
        except CbirError as e:
            raise CbirError(f"{where}: cannot convert this jit program ({e}); convert its .pdparams state dict instead") from None
    else:
        state_np = read_pdparams(weights)
    k = mobilenet_classes(state_np, where)
    out: Dict[str, Any] = {}
    for key, v in state_np.items():
        a = torch.from_numpy(np.ascontiguousarray(np.asarray(v), dtype=np.float32).copy())
        if key.endswith("._mean"):
            base = key[: -len("._mean")]
            out[f"{base}.running_mean"] = a
            out[f"{base}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
        elif key.endswith("._variance"):
            out[key[: -len("._variance")] + ".running_var"] = a
        elif key.endswith(".weight") and a.ndim == 2:  # Linear: Paddle [in, out], torch [out, in]
            out[key] = a.t().contiguous()
        else:
            out[key] = a
    net = MobileNetV2(num_classes=k)
    own = net.state_dict()
    missing = sorted(set(own) - set(out))
    unexpected = sorted(set(out) - set(own))
    wrong = [n for n in own if n in out and tuple(out[n].shape) != tuple(own[n].shape)]
    if missing or unexpected or wrong:
        raise CbirError(f"{where}: converted keys do not fit cbir's MobileNetV2: missing {missing[:4]}, unexpected {unexpected[:4]}, shape {wrong[:4]}")
    return out, {"num_classes": k, "tensors": len(out), "source": where}


def torch_parity(weights: os.PathLike, torch_state: Dict[str, Any], images: Optional[List[np.ndarray]] = None,
                 input_size: Sequence[int] = SEED_INPUT_SIZE) -> Dict[str, float]:
    """Max relative difference of the pooled features (and logits) of the Paddle model and the converted torch model.

    ``images``: RGB uint8 arrays (resized to ``input_size`` as the seed does), else a few random ones.
    """
    import cv2
    import torch

    from .mobilenetv2 import MobileNetV2

    bb = paddle_backbone("mobilenet_v2", weights)
    net = MobileNetV2(num_classes=bb.num_classes)
    net.load_state_dict(torch_state)
    net.eval()
    if images is None:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (300, 400, 3), dtype=np.uint8) for _ in range(2)]
    h, w = int(input_size[0]), int(input_size[1])
    x = torch.from_numpy(np.stack([cv2.resize(im, (w, h)) for im in images])).permute(0, 3, 1, 2).float() / 255.0
    rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))  # noqa: E731
    with torch.inference_mode():
        xt = (x - bb.mean) / bb.std
        feat_t = torch.flatten(torch.nn.functional.adaptive_avg_pool2d(net.forward_features(xt), 1), 1)
        res = {"pooled_max_rel": rel(feat_t, bb.pooled(x))}
        if bb.num_classes:
            res["logits_max_rel"] = rel(net(xt), bb.classify(x))
    return res
