"""``lightglue`` and ``lighterglue``: kornia's LightGlue as a fixed graph (every layer, no adaptive pruning).

keypoints, descriptors and image sizes of two images -> ``matches (K, 2)``, ``scores (K,)``; nothing stays outside
(:func:`cbir.export.runtime.lightglue_match`). The attention blocks run through the forwards of :mod:`..patches`.
"""

from __future__ import annotations

from typing import Any, Dict

from ..spec import ExportSpec
from . import MODELS


def lightglue_graph(net):
    """kornia ``LightGlue`` without adaptive depth or width (a fixed graph): ``kpts0 (1, M, 2)``, ``kpts1 (1, N, 2)``
    pixels, ``desc0``, ``desc1``, ``size0``, ``size1`` ``(1, 2)`` = (W, H) -> ``matches (K, 2)`` int64, ``scores (K,)``."""
    import torch
    from kornia.feature.lightglue import filter_matches, normalize_keypoints
    from torch import nn

    class LightGlueGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lg = net
            self.n_layers = int(net.conf.n_layers)
            self.th = float(net.conf.filter_threshold)

        def forward(self, kpts0, kpts1, desc0, desc1, size0, size1):
            lg = self.lg
            k0, k1 = normalize_keypoints(kpts0, size0), normalize_keypoints(kpts1, size1)
            d0, d1 = lg.input_proj(desc0), lg.input_proj(desc1)
            e0, e1 = lg.posenc(k0), lg.posenc(k1)
            for i in range(self.n_layers):
                d0, d1 = lg.transformers[i](d0, d1, e0, e1)
            scores, _ = lg.log_assignment[self.n_layers - 1](d0, d1)
            m0, _, ms0, _ = filter_matches(scores, self.th)
            idx0 = torch.nonzero(m0[0] > -1)[:, 0]
            return torch.stack([idx0, m0[0].index_select(0, idx0)], 1), ms0[0].index_select(0, idx0)

    return LightGlueGraph().eval()


def lightglue_identity(matcher) -> Dict[str, Any]:
    """What decides LightGlue's fixed graph: the architecture (widths, depth, heads), the filter threshold, the weights."""
    from ...weights import cached_sha256

    c = matcher.net.conf
    arch = {k: getattr(c, k) for k in ("input_dim", "descriptor_dim", "n_layers", "num_heads", "add_scale_ori", "add_laf", "scale_coef")
            if hasattr(c, k)}
    return {"model": matcher.name, "features": matcher.features, "filter_threshold": float(c.filter_threshold), "arch": arch,
            "weights": cached_sha256(matcher.weights_path)}


def lightglue_spec(matcher) -> ExportSpec:
    """Spec of a built LightGlue / LighterGlue matcher of :mod:`cbir.local.lightglue`."""
    import torch

    d = int(matcher.net.conf.input_dim)

    def pair(m, n, seed):
        g = torch.Generator().manual_seed(seed)
        k0 = torch.rand(1, m, 2, generator=g) * torch.tensor([319.0, 239.0])
        k1 = torch.rand(1, n, 2, generator=g) * torch.tensor([299.0, 259.0])
        d0 = torch.nn.functional.normalize(torch.randn(1, m, d, generator=g), dim=-1)
        d1 = torch.nn.functional.normalize(d0[:, torch.randint(0, m, (n,), generator=g)] + 0.3 * torch.randn(1, n, d, generator=g), dim=-1)
        return k0, k1, d0, d1, torch.tensor([[320.0, 240.0]]), torch.tensor([[300.0, 260.0]])

    ident = lightglue_identity(matcher)
    return ExportSpec(
        name=matcher.name, module=lightglue_graph(matcher.net), args=pair(200, 180, 0),
        input_names=["kpts0", "kpts1", "desc0", "desc1", "size0", "size1"], output_names=["matches", "scores"],
        dynamic_axes={"kpts0": {1: "m"}, "kpts1": {1: "n"}, "desc0": {1: "m"}, "desc1": {1: "n"}, "matches": {0: "k"}, "scores": {0: "k"}},
        identity=ident, check_args=[pair(64, 300, 1)],
        outside="nothing; unlike kornia's default, no adaptive depth (early stop) or width (point pruning): their "
                "data-dependent control flow has no fixed graph",
    )


def lightglue_factory(kind: str):
    """The factory of ``lightglue`` / ``lighterglue``: ``--conf features=...`` (default aliked / xfeat) and matcher options."""
    def factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
        from ...local import build_matcher

        conf = dict(conf or {})
        features = conf.pop("features", "xfeat" if kind == "lighterglue" else "aliked")
        return lightglue_spec(build_matcher(kind, features=features, weights=matcher_weights or weights, **conf))

    return factory


MODELS.register("lightglue")(lightglue_factory("lightglue"))
MODELS.register("lighterglue")(lightglue_factory("lighterglue"))
