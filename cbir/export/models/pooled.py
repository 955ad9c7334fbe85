"""``pooled:BACKBONE`` (and the bare backbone names): the whole ``pooled`` descriptor as one graph.

image ``(B, 3, H, W)`` -> backbone -> GeM / GAP / max per stage (means in float64) -> L2 -> concat -> L2 ->
``descriptor (B, D)``. Multi-scale and flip averaging stay outside (:func:`cbir.export.runtime.pooled_extract`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ...errors import CbirError
from ..spec import ExportSpec, image_axes, rand_image
from . import MODELS


def pool_f64(x, method: str, p: float):
    """:func:`cbir.extractors.pooled.pool_map` (unweighted) with the spatial mean taken in float64; returns float64.

    onnxruntime's float32 ``ReduceMean`` over a large map (ALIKED's block1 is full resolution) drifts by up to ~1e-4
    relative (see :func:`cbir.export.patches._instance_norm_forward`). ReLU and the clamp stay in float32: onnxruntime 1.32's Relu+Clip
    fusion rejects a float64 Clip ("Unexpected data type for Clip 'min' input of 11"). The parity tests compare this
    with pool_map: keep the two in step (gem's eps is 1e-6).
    """
    import torch
    import torch.nn.functional as F

    if method == "gem":
        return F.relu(x).clamp(min=1e-6).to(torch.float64).pow(p).mean((-2, -1)).pow(1.0 / p)
    if method == "gap":
        return x.to(torch.float64).mean((-2, -1))
    if method == "max":
        return x.amax((-2, -1)).to(torch.float64)
    raise CbirError(f"pooled export: unknown pool {method!r}")


def pooled_graph(ext):
    """The whole ``pooled`` descriptor of extractor ``ext`` as a module: image ``(B, 3, H, W)`` -> ``(B, D)``."""
    import torch
    from torch import nn

    from ...extractors.pooled import l2n_t

    if ext.conf.get("weighting"):
        raise CbirError("pooled: foreground weighting (class maps) has no ONNX export; use --runtime torch")

    class PooledGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = ext.net
            self.stages = list(ext.stages)
            self.pool, self.p = ext.conf["pool"], float(ext.conf["p"])

        def forward(self, image):
            maps = self.backbone(image)
            parts = [l2n_t(pool_f64(maps[s], self.pool, self.p)) for s in self.stages]
            return l2n_t(torch.cat(parts, 1)).to(torch.float32)

    return PooledGraph().eval()


def pooled_spec(ext, name: Optional[str] = None) -> ExportSpec:
    """Spec of a built :class:`~cbir.extractors.pooled.PooledExtractor` (its conf, stages and weights)."""
    import torch

    if ":" in str(ext.conf["backbone"]):
        raise CbirError(f"backbone {ext.conf['backbone']!r} has no ONNX export (cbir exports its torch backbones: "
                        "xfeat, aliked-*, disk, mobilenet_v2, resnet*)")
    module = pooled_graph(ext)
    # a size that is no multiple of 32, so the padding the backbones add is traced (it is skipped at multiples)
    args = (rand_image(250, 330),)
    return ExportSpec(
        name=name or f"pooled:{ext.conf['backbone']}", module=module, args=args,
        input_names=["image"], output_names=["descriptor"],
        dynamic_axes={**image_axes("image"), "descriptor": {0: "batch"}},
        identity=pooled_identity(ext),
        check_args=[(torch.cat([rand_image(300, 200, seed=1), rand_image(300, 200, seed=2)]),), (rand_image(256, 384, seed=3),)],
    )


def pooled_identity(ext) -> Dict[str, Any]:
    """What decides the pooled graph: backbone, stages, pooling and its exponent, backbone options, weight checksums."""
    c = ext.conf
    return {"model": "pooled", "backbone": c["backbone"], "stages": list(ext.stages), "pool": c["pool"], "p": float(c["p"]),
            "backbone_conf": c.get("backbone_conf") or None, "weights": ext.weights()}


def pooled_factory(backbone: str):
    """The factory of ``pooled:BACKBONE``: ``--conf`` takes ``stages``, ``pool`` and ``p``."""
    def factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
        from ...extractors.pooled import PooledExtractor

        c = {k: v for k, v in (conf or {}).items() if k in ("stages", "pool", "p")}
        unknown = sorted(set(conf or {}) - {"stages", "pool", "p"})
        if unknown:
            raise CbirError(f"pooled export: unknown option(s) {unknown}; accepted: p, pool, stages")
        ext = PooledExtractor({"backbone": backbone, "weights": weights, **c})
        return pooled_spec(ext, name=f"pooled:{backbone}")

    return factory


def _register() -> None:
    from ...models.backbones import backbone_names

    for bb in backbone_names():
        f = pooled_factory(bb)
        MODELS.register(f"pooled:{bb}")(f)
        MODELS.register(bb)(f)  # bare backbone names: the pooled descriptor


_register()
