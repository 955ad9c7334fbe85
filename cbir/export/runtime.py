"""The onnxruntime side of the ``runtime`` switch: the cache of exported models, the sessions and the runners.

The switch itself (which runtime a network uses) is :mod:`cbir.runtime`, the bottom floor; the runners below register
themselves there by name (``pooled``, ``xfeat``, ``aliked``, ``disk``, ``lightglue``, ``loftr``), so the extractors
and matchers ask for them without importing this floor. An index built with one runtime is queried with the other
(the descriptors agree to float tolerance, see the README's "ONNX" section).

With ``onnx``, a component asks :func:`cached_session` for the session of its model: the first use exports the model
(see :mod:`cbir.export.models`) into the cache folder ``$CBIR_ONNX_CACHE`` (default ``~/.cache/cbir/onnx``) under a key
made of the model identity (architecture, options baked into the graph, sha256 of the weights) and the versions of
cbir's wrappers, torch and kornia; later uses, in any process, load that file. Sessions run on the CPU provider with
torch's thread count and without spinning idle threads (the ``OMP_WAIT_POLICY=PASSIVE`` of the torch path).

The runners below run a graph and do, in torch with kornia's own code, what the README says stays outside it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..errors import CbirError
from ..runtime import (RUNTIMES, Session, default_runtime, register_runner, torch_threads,  # noqa: F401 - re-exported
                       require_onnxruntime, resolve_runtime, set_default_runtime)

_SESSIONS: Dict[Any, "Session"] = {}
_LOCK = threading.Lock()


# ----------------------------------------------------------------------------- sessions


def cache_dir() -> Path:
    return Path(os.environ.get("CBIR_ONNX_CACHE") or "~/.cache/cbir/onnx").expanduser()


#: cbir's source files whose code is traced into the graphs (wrappers, backbones, pooling); their bytes are in the key
_TRACED_SOURCES = ("export/patches.py", "export/spec.py", "export/write.py", "export/models/*.py", "extractors/pooled.py",
                   "models/*.py")


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 of the sources in :data:`_TRACED_SOURCES`: an edited wrapper or backbone is a new key even when nobody
    bumped ``EXPORT_FORMAT`` or the version (a stale export would otherwise be reused from the cache)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pattern in _TRACED_SOURCES:
        for f in sorted(root.glob(pattern)):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_key(identity: Dict[str, Any]) -> str:
    """Key of an export: the model identity (every option baked into the graph, weight checksums), the opset, the
    versions of cbir, torch (the exporter) and kornia (the architectures), and :func:`code_fingerprint`."""
    import kornia
    import torch

    from .. import __version__
    from .spec import EXPORT_FORMAT, OPSET

    full = {"identity": identity, "format": EXPORT_FORMAT, "opset": OPSET, "cbir": __version__, "torch": torch.__version__,
            "kornia": kornia.__version__, "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_model(identity: Dict[str, Any], make_spec: Callable[[], Any]) -> Path:
    """Path of the cached export of the model ``identity`` names; exported with ``make_spec()`` when absent."""
    from .write import safe_name, write_onnx

    path = cache_dir() / f"{safe_name(str(identity.get('model', 'model')))}-{cache_key(identity)}.onnx"
    if not path.is_file():
        require_onnxruntime()
        write_onnx(make_spec(), path)
    return path


def cached_session(identity: Dict[str, Any], make_spec: Callable[[], Any]) -> Session:
    """The session of model ``identity`` (exported on first use, see :func:`cached_model`), one per process and thread count."""
    require_onnxruntime()
    path = cached_model(identity, make_spec)
    key = (str(path), torch_threads())
    with _LOCK:
        s = _SESSIONS.get(key)
        if s is None:
            s = _SESSIONS[key] = Session(path)
    return s


# ----------------------------------------------------------------------------- global descriptors


def pooled_extract(ext, images: List[np.ndarray]) -> np.ndarray:
    """``PooledExtractor.extract`` with the descriptor graph in onnxruntime (scales and flips as in torch)."""
    from .models.pooled import pooled_identity, pooled_spec

    if ext.conf.get("weighting"):
        raise CbirError("pooled: foreground weighting (class maps) runs in torch only; drop --runtime onnx")
    sess = cached_session(pooled_identity(ext), lambda: pooled_spec(ext))
    return pooled_with(ext, images, lambda v: sess.run({"image": v})[0])


def pooled_with(ext, images: List[np.ndarray], forward: Callable) -> np.ndarray:
    """The pooled extractor's code around its graph (resize, batches, scales, flips, sum, L2) with ``forward`` (a float
    ``(B, 3, H, W)`` tensor -> ``(B, D)`` array) as the graph."""
    import torch

    from ..vectors import l2n
    from ..extractors.batching import resize_to, scaled_batches

    out = np.zeros((len(images), getattr(ext, "raw_dim", ext.dim)), np.float32)
    images = resize_to(images, ext.conf.get("input_size") or getattr(ext.net, "input_size", None))
    with torch.inference_mode():
        for idx, views in scaled_batches(images, ext.conf["scales"], ext.conf["flip"]):
            acc = 0
            for v in views:
                acc = acc + forward(v)
            out[idx] = l2n(acc)
    return out


# ----------------------------------------------------------------------------- local features


def xfeat_detect(ext, x) -> Dict[str, Any]:
    """kornia ``XFeat.detectAndCompute(x)[0]`` with the network in onnxruntime (x: ``(1, 3, H, W)`` in [0, 1])."""
    import torch
    import torch.nn.functional as F

    from .models.local import local_identity
    from .models.xfeat import xfeat_spec

    H, W = x.shape[-2:]
    if H < 32 or W < 32:  # kornia pads those up to 32; not worth a graph
        return ext.net.detectAndCompute(x)[0]
    sess = cached_session(local_identity(ext), lambda: xfeat_spec(ext))
    net = ext.net
    with torch.inference_mode():
        x, rh1, rw1 = net._preprocess_tensor(x)  # kornia's bilinear resize to multiples of 32, in torch
        M1, K1h, H1 = (torch.from_numpy(a) for a in sess.run({"image": x}))
        _H1, _W1 = K1h.shape[-2:]
        # the rest of kornia's detectAndCompute, unchanged
        mkpts = net._nms(K1h, threshold=net.detection_threshold, kernel_size=5)
        scores = (net._nearest(K1h, mkpts, _H1, _W1) * net._bilinear(H1, mkpts, _H1, _W1)).squeeze(-1)
        scores[torch.all(mkpts == -1, dim=-1)] = -1
        k = min(net.top_k, scores.shape[-1])
        scores, idxs = torch.topk(scores, k=k, dim=-1, largest=True, sorted=True)
        mkpts = torch.cat([torch.gather(mkpts[..., 0], -1, idxs)[..., None], torch.gather(mkpts[..., 1], -1, idxs)[..., None]], dim=-1)
        feats = F.normalize(net.interpolator(M1, mkpts, H=_H1, W=_W1), dim=-1)
        mkpts = mkpts * torch.tensor([rw1, rh1]).view(1, 1, -1)
        valid = scores > 0
        return {"keypoints": mkpts[0][valid[0]], "scores": scores[0][valid[0]], "descriptors": feats[0][valid[0]]}


def aliked_detect(ext, x):
    """kornia ``ALIKED(x)[0]`` with the dense maps from onnxruntime; DKD and the SDDH head run in torch."""
    import torch
    from kornia.feature.aliked.aliked import ALIKEDFeatures

    from .models.aliked import aliked_spec
    from .models.local import local_identity

    sess = cached_session(local_identity(ext), lambda: aliked_spec(ext))
    net = ext.net
    h, w = x.shape[-2:]
    with torch.inference_mode():
        feature_map, score_map = (torch.from_numpy(a) for a in sess.run({"image": x}))
        keypoints, kptscores, _ = net.dkd(score_map, image_size=None)
        descriptors, _ = net.desc_head(feature_map, keypoints)
        wh = torch.tensor([w - 1, h - 1], dtype=torch.float32)
        return ALIKEDFeatures(wh * (keypoints[0] + 1) / 2.0, descriptors[0], kptscores[0])


def disk_detect(ext, x, n: Optional[int], window_size: int, score_threshold: float):
    """kornia ``DISK(x, ..., pad_if_not_divisible=True)[0]`` with the U-Net in onnxruntime."""
    import torch
    from kornia.feature.disk.detector import heatmap_to_keypoints

    from .models.disk import disk_spec
    from .models.local import local_identity

    sess = cached_session(local_identity(ext), lambda: disk_spec(ext))
    with torch.inference_mode():
        heat, desc = (torch.from_numpy(a) for a in sess.run({"image": x}))
        kps = heatmap_to_keypoints(heat, n=n, window_size=window_size, score_threshold=score_threshold)
        return kps[0].merge_with_descriptors(desc[0])


# ----------------------------------------------------------------------------- matchers


def lightglue_match(matcher, data: Dict[str, Dict[str, Any]]):
    """``(matches (K, 2) int64, scores (K,))`` of LightGlue's fixed graph (no adaptive depth or width)."""
    from .models.lightglue import lightglue_identity, lightglue_spec

    sess = cached_session(lightglue_identity(matcher), lambda: lightglue_spec(matcher))
    d0, d1 = data["image0"], data["image1"]
    m, s = sess.run({"kpts0": d0["keypoints"], "kpts1": d1["keypoints"], "desc0": d0["descriptors"], "desc1": d1["descriptors"],
                     "size0": d0["image_size"], "size1": d1["image_size"]})
    return m.astype(np.int64).reshape(-1, 2), s.astype(np.float32).reshape(-1)


def loftr_match(matcher, image0, image1) -> Dict[str, np.ndarray]:
    """kornia LoFTR's ``keypoints0``, ``keypoints1``, ``confidence`` of grey ``(1, 1, H, W)`` tensors, from onnxruntime."""
    from .models.loftr import loftr_identity, loftr_spec

    c = matcher.conf
    ident = loftr_identity(matcher.net, c["variant"], c["match_threshold"], c["border_rm"], matcher.weights_path)
    sess = cached_session(ident, lambda: loftr_spec(matcher.net, ident))
    k0, k1, conf = sess.run({"image0": image0, "image1": image1})
    return {"keypoints0": k0, "keypoints1": k1, "confidence": conf}


for _name, _fn in (("pooled", pooled_extract), ("xfeat", xfeat_detect), ("aliked", aliked_detect), ("disk", disk_detect),
                   ("lightglue", lightglue_match), ("loftr", loftr_match)):
    register_runner(_name, _fn)
