"""ONNX export of cbir's networks: a registry of model names, tensor-only wrappers, and :func:`export_model`.

Every wrapper takes and returns tensors only (no dicts), and is written so that the legacy TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``) keeps image sizes and point counts dynamic: sizes are computed with tensor
arithmetic from the input's shape, never frozen into Python numbers at trace time. The dynamo exporter of torch
>= 2.9 (the default) fails on these models' data-dependent shapes (padding to a multiple of 32, the crop back,
top-k keypoints), so every model here is exported with ``dynamo=False``, opset :data:`OPSET`.

What is inside each graph (``whole``) and what stays outside (``outside``, run by :mod:`cbir.export.runtime` in
torch with kornia's own code, so both runtimes share it):

==========================  =======================================================  =================================
model                       graph                                                    outside the graph
==========================  =======================================================  =================================
``pooled:BACKBONE``         image -> backbone -> GeM/GAP/max per stage -> L2 ->        (multi-scale / flip averaging)
(bare backbone names too)   concat -> L2 = the ``pooled`` descriptor
``local:xfeat``             image (sides multiples of 32) -> CNN -> dense            before: bilinear resize to /32;
                            descriptors, keypoint heatmap, reliability                 after: NMS, top-k, bicubic sampling
``local:aliked``            image -> pad -> CNN -> dense features + score map          DKD (NMS, top-k, soft-argmax),
                                                                                       SDDH descriptor head
``local:disk``              image -> pad /16 -> U-Net -> heatmap + dense descriptors   NMS, top-k, sampling
``lightglue``/``lighterglue`` keypoints, descriptors, sizes -> matches, scores         nothing (no adaptive pruning)
``superpoint+superglue``    image0, image1 -> mkpts0, mkpts1, confidence (seed 001)    nothing
``loftr``                   image0, image1 -> keypoints0, keypoints1, confidence       nothing
==========================  =======================================================  =================================
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import CbirError
from ..registry import Registry

#: opset of every export (grid_sample needs >= 16)
OPSET = 17
#: bump when a wrapper changes, so cached exports are rebuilt (2: float64 statistics for instance norms and pooling)
EXPORT_FORMAT = 2

#: model name -> factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec
MODELS: Registry = Registry("ONNX model")


@dataclass
class ExportSpec:
    """A tensor-only module ready for ``torch.onnx.export``, with its example inputs and dynamic axes."""

    name: str
    module: Any
    args: Tuple[Any, ...]
    input_names: List[str]
    output_names: List[str]
    dynamic_axes: Dict[str, Dict[int, str]]
    identity: Dict[str, Any]
    whole: bool = True
    outside: str = ""
    #: more example inputs for the check after export (another image size, other point counts)
    check_args: List[Tuple[Any, ...]] = field(default_factory=list)


# ----------------------------------------------------------------------------- trace-safe pieces


def _hw(x):
    """``(h, w)`` of a ``(..., H, W)`` tensor as 0-d int64 tensors that tracing records (not frozen constants)."""
    import torch

    s = torch._shape_as_tensor(x)
    return s[-2], s[-1]


def _dcn_forward(self, x):
    """kornia's ``DeformableConv2d.forward`` with the offset bound ``max(h, w) / 4`` computed as a tensor.

    kornia's Python ``max(h, w)`` is frozen by tracing to the side that was larger at export: a portrait image then
    got the landscape bound (measured: block4 off by 1.1 at 300x200 after an export at 250x330).
    """
    import torch
    from kornia.feature.aliked.deform_conv2d import deform_conv2d

    h, w = _hw(x)
    max_offset = torch.maximum(h, w).to(x.dtype) / 4.0
    out = self.offset_conv(x)
    if self.mask:
        o1, o2, mask_w = torch.chunk(out, 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask_w = torch.sigmoid(mask_w)
    else:
        offset, mask_w = out, None
    offset = torch.minimum(torch.maximum(offset, -max_offset), max_offset)
    return deform_conv2d(input=x, offset=offset, weight=self.regular_conv.weight, bias=self.regular_conv.bias,
                         stride=self.stride, padding=self.padding, dilation=self.dilation, mask=mask_w)


def _rotate_half(x):
    """kornia LightGlue's ``rotate_half`` on ``(B, H, N, D)`` with explicit dims (see :func:`_self_block_forward`)."""
    import torch

    b, h, n, d = x.shape[0], x.shape[1], x.shape[2], int(x.shape[3])
    t = x.reshape(b, h, n, d // 2, 2).permute(4, 0, 1, 2, 3)
    return torch.stack((-t[1], t[0]), dim=4).reshape(b, h, n, d)


def _rotary(freqs, t):
    return (t * freqs[0]) + (_rotate_half(t) * freqs[1])


def _self_block_forward(self, x, encoding, mask=None):
    """kornia LightGlue ``SelfBlock.forward`` with explicit-rank reshapes (``unflatten(-1, (h, -1, 3))`` loses the rank
    in the TorchScript exporter, whose ``transpose`` then fails)."""
    import torch

    b, n = x.shape[0], x.shape[1]
    # (B, N, H, D, 3) -> (3, B, H, N, D): q, k, v by the first index (the exporter mis-ranks ``qkv[..., i]`` and
    # then resolves the softmax's dim=-1 to an axis that does not exist)
    qkv = self.Wqkv(x).reshape(b, n, self.num_heads, self.head_dim, 3).permute(4, 0, 2, 1, 3)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = _rotary(encoding, q), _rotary(encoding, k)
    # the attention spelled out: the exporter's scaled_dot_product_attention emits a Concat onnxruntime rejects
    scale = float(q.shape[-1]) ** -0.5
    context = torch.matmul(torch.softmax(torch.matmul(q, k.transpose(2, 3)) * scale, dim=3), v)
    message = self.out_proj(context.transpose(1, 2).reshape(b, n, self.embed_dim))
    return x + self.ffn(torch.cat([x, message], 2))


def _cross_block_forward(self, x0, x1, mask=None):
    """kornia LightGlue ``CrossBlock.forward`` (CPU path, no mask) with explicit-rank reshapes."""
    import torch
    import torch.nn.functional as F

    b, m, n = x0.shape[0], x0.shape[1], x1.shape[1]
    heads, inner = self.heads, int(self.to_qk.out_features)
    dh = inner // heads
    qk0 = self.to_qk(x0).reshape(b, m, heads, dh).transpose(1, 2)
    qk1 = self.to_qk(x1).reshape(b, n, heads, dh).transpose(1, 2)
    v0 = self.to_v(x0).reshape(b, m, heads, dh).transpose(1, 2)
    v1 = self.to_v(x1).reshape(b, n, heads, dh).transpose(1, 2)
    qk0, qk1 = qk0 * self.scale**0.5, qk1 * self.scale**0.5
    # positive dims: the exporter's transpose mis-normalises (-2, -1) on these einsum outputs
    sim = torch.matmul(qk0, qk1.transpose(2, 3))
    m0 = torch.matmul(F.softmax(sim, dim=3), v1)
    m1 = torch.matmul(F.softmax(sim.transpose(2, 3), dim=3), v0)
    m0 = self.to_out(m0.transpose(1, 2).reshape(b, m, inner))
    m1 = self.to_out(m1.transpose(1, 2).reshape(b, n, inner))
    return x0 + self.ffn(torch.cat([x0, m0], 2)), x1 + self.ffn(torch.cat([x1, m1], 2))


def _match_assignment_forward(self, desc0, desc1):
    """kornia LightGlue ``MatchAssignment.forward`` with positive transpose dims and the dustbin row and column
    concatenated (kornia writes them in place)."""
    import torch
    import torch.nn.functional as F

    mdesc0, mdesc1 = self.final_proj(desc0), self.final_proj(desc1)
    d = int(mdesc0.shape[-1])
    mdesc0, mdesc1 = mdesc0 / d**0.25, mdesc1 / d**0.25
    sim = torch.matmul(mdesc0, mdesc1.transpose(1, 2))
    z0, z1 = self.matchability(desc0), self.matchability(desc1)
    core = F.log_softmax(sim, 2) + F.log_softmax(sim.transpose(1, 2), 2).transpose(1, 2)
    core = core + F.logsigmoid(z0) + F.logsigmoid(z1).transpose(1, 2)
    top = torch.cat([core, F.logsigmoid(-z0)], 2)
    bottom = torch.cat([F.logsigmoid(-z1).transpose(1, 2), torch.zeros_like(z0[:, :1])], 2)
    return torch.cat([top, bottom], 1), sim


def _posenc_forward(self, x):
    """kornia LightGlue ``LearnableFourierPositionalEncoding.forward`` with positive dims.

    kornia's ``repeat_interleave(2, dim=-1)`` on this 5-D tensor made the TorchScript exporter rewrite the pooled
    constant -1 to 4 across the whole graph (every ``:-1`` slice and ``-1`` fill of ``filter_matches`` with it).
    """
    import torch

    projected = self.Wr(x)
    emb = torch.stack([torch.cos(projected), torch.sin(projected)], 0).unsqueeze(2)
    return emb.repeat_interleave(2, dim=4)


def _xfeat_unfold2d(self, x, ws: int = 2):
    """kornia ``XFeatModel._unfold2d`` as ``pixel_unshuffle`` (the same channel order, ``c * ws^2 + dy * ws + dx``):
    the exporter has no ``Tensor.unfold`` for inputs of dynamic size."""
    import torch.nn.functional as F

    return F.pixel_unshuffle(x, ws)


def _loftr_get_fine_match(self, coords_normed, data):
    """kornia LoFTR ``FineMatching.get_fine_match`` (inference, no per-sample scales) without its
    ``[: len(data["mconf"])]``, a no-op at inference that tracing freezes to the match count at export."""
    mkpts1_f = data["mkpts1_c"] + coords_normed * (self.W // 2) * self.scale
    data.update({"mkpts0_f": data["mkpts0_c"], "mkpts1_f": mkpts1_f})


def _instance_norm_forward(self, x):
    """torch ``InstanceNorm{1,2,3}d`` with the mean and variance accumulated in float64 (the output stays float32).

    onnxruntime's CPU ``InstanceNormalization`` and ``ReduceMean`` sum a large axis in float32 lane by lane; on images
    with flat regions the rounding errors add up instead of cancelling (measured, onnxruntime 1.32: the mean of a
    224x320 synthetic grey image off by 9.5e-5 relative, torch's by 1.3e-7; the same 320-wide rows first, then the 224
    row means: 8e-7). XFeat's input norm and DISK's U-Net take such means over whole images: the pooled xfeat
    descriptor of a synthetic image moved by 4.3e-4 of its norm (max abs 1.32e-4), DISK's local descriptors by up to
    2.9e-4; with float64 sums 2.4e-6 and 6.5e-6, whatever the image size.
    """
    import torch

    if self.track_running_stats and not self.training:  # running statistics: no reduction in the graph
        return type(self).forward(self, x)
    nd = {torch.nn.InstanceNorm1d: 1, torch.nn.InstanceNorm2d: 2, torch.nn.InstanceNorm3d: 3}[type(self)]
    dims = tuple(range(x.dim() - nd, x.dim()))
    xd = x.to(torch.float64)
    mean = xd.mean(dims, keepdim=True)
    var = (xd - mean).pow(2).mean(dims, keepdim=True)
    y = (x - mean.to(x.dtype)) * torch.rsqrt(var + self.eps).to(x.dtype)
    if self.affine:
        shape = (-1,) + (1,) * nd
        y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
    return y


def _trace_safe_forwards():
    """``{kornia class: trace-safe forward}`` (or ``{class: {method: function}}``) for the classes of this kornia."""
    import torch

    out = {cls: _instance_norm_forward for cls in (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)}
    try:
        from kornia.feature.aliked.aliked import DeformableConv2d

        out[DeformableConv2d] = _dcn_forward
    except ImportError:  # pragma: no cover
        pass
    try:
        from kornia.feature.loftr.utils.fine_matching import FineMatching

        out[FineMatching] = {"get_fine_match": _loftr_get_fine_match}
    except ImportError:  # pragma: no cover
        pass
    try:
        from kornia.feature.xfeat import XFeatModel

        out[XFeatModel] = {"_unfold2d": _xfeat_unfold2d}
    except ImportError:  # pragma: no cover
        pass
    try:
        from kornia.feature.lightglue import CrossBlock, SelfBlock

        from kornia.feature.lightglue import LearnableFourierPositionalEncoding, MatchAssignment

        out[LearnableFourierPositionalEncoding] = _posenc_forward

        out[SelfBlock] = _self_block_forward
        out[CrossBlock] = _cross_block_forward
        out[MatchAssignment] = _match_assignment_forward
    except ImportError:  # pragma: no cover
        pass
    return out


@contextlib.contextmanager
def trace_safe(module):
    """Swap in trace-safe forwards (see :func:`_trace_safe_forwards`) for the duration of an export; the torch path is
    untouched (the forwards compute the same values, checked after every export)."""
    patched = []
    forwards = _trace_safe_forwards()
    for m in module.modules():
        fns = forwards.get(type(m))
        if fns is None:
            continue
        for attr, fn in (fns.items() if isinstance(fns, dict) else [("forward", fns)]):
            setattr(m, attr, types.MethodType(fn, m))
            patched.append((m, attr))
    try:
        yield module
    finally:
        for m, attr in patched:
            delattr(m, attr)


def _rand_image(h: int, w: int, c: int = 3, seed: int = 0):
    """A smooth random image: detectors find maxima, attention sees varied descriptors."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, c, max(2, h // 8), max(2, w // 8), generator=g)
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


# ----------------------------------------------------------------------------- wrappers


def _nn():
    from torch import nn

    return nn


def _pool_f64(x, method: str, p: float):
    """:func:`cbir.extractors.pooled.pool_map` (unweighted) with the spatial mean taken in float64; returns float64.

    onnxruntime's float32 ``ReduceMean`` over a large map (ALIKED's block1 is full resolution) drifts by up to ~1e-4
    relative (see :func:`_instance_norm_forward`). ReLU and the clamp stay in float32: onnxruntime 1.32's Relu+Clip
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

    from ..extractors.pooled import l2n_t

    nn = _nn()
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
            parts = [l2n_t(_pool_f64(maps[s], self.pool, self.p)) for s in self.stages]
            return l2n_t(torch.cat(parts, 1)).to(torch.float32)

    return PooledGraph().eval()


def xfeat_dense(net):
    """XFeat (kornia ``KF.XFeat``) up to its dense maps: image ``(B, 3, H, W)`` in [0, 1], ``H`` and ``W`` multiples
    of 32 -> ``feats (B, 64, H/8, W/8)`` L2-normalised, ``heatmap (B, 1, H, W)`` keypoint probabilities,
    ``reliability (B, 1, H/8, W/8)``.

    kornia first resizes the image (bilinear) to its sides floored to multiples of 32; that resize stays outside the
    graph (onnxruntime's Resize moved the heatmap by up to 8e-5, against 4e-6 without it)."""
    import torch.nn.functional as F

    nn = _nn()

    class XFeatDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net.net

        def forward(self, image):
            M1, K1, H1 = self.net(image)
            M1 = F.normalize(M1, dim=1)
            return M1, type(net)._get_kpts_heatmap(K1), H1

    return XFeatDense().eval()


def aliked_dense(net):
    """ALIKED (kornia ``KF.ALIKED``) up to its dense maps: image ``(B, 3, H, W)`` -> ``feature_map (B, dim, H, W)``,
    ``score_map (B, 1, H, W)``; kornia's ``extract_dense_map`` with the centred replicate padding traced as arithmetic."""
    import torch
    import torch.nn.functional as F

    nn = _nn()

    class AlikedDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image):
            n = self.net
            h, w = _hw(image)
            ph, pw = (32 - h % 32) % 32, (32 - w % 32) % 32
            top, left = ph // 2, pw // 2
            x = F.pad(image, [left, pw - left, top, ph - top], mode="replicate")
            x1 = n.block1(x)
            x2 = n.block2(n.pool2(x1))
            x3 = n.block3(n.pool4(x2))
            x4 = n.block4(n.pool4(x3))
            x1 = n.gate(n.conv1(x1))
            x2 = n.gate(n.conv2(x2))
            x3 = n.gate(n.conv3(x3))
            x4 = n.gate(n.conv4(x4))
            x1234 = torch.cat([x1, n.upsample2(x2), n.upsample8(x3), n.upsample32(x4)], dim=1)
            score_map = torch.sigmoid(n.score_head(x1234))
            feature_map = F.normalize(x1234, p=2, dim=1)
            return feature_map[..., top : top + h, left : left + w], score_map[..., top : top + h, left : left + w]

    return AlikedDense().eval()


def disk_dense(net):
    """DISK (kornia ``KF.DISK``) up to its dense maps: image ``(B, 3, H, W)`` -> ``heatmap (B, 1, H, W)``,
    ``descriptors (B, 128, H, W)`` (zero padding to multiples of 16, cropped back, as ``pad_if_not_divisible``)."""
    import torch.nn.functional as F

    nn = _nn()

    class DiskDense(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image):
            h, w = _hw(image)
            x = F.pad(image, [0, (16 - w % 16) % 16, 0, (16 - h % 16) % 16], value=0.0)
            heat, desc = self.net.heatmap_and_dense_descriptors(x)
            return heat[..., :h, :w], desc[..., :h, :w]

    return DiskDense().eval()


def lightglue_graph(net):
    """kornia ``LightGlue`` without adaptive depth or width (a fixed graph): ``kpts0 (1, M, 2)``, ``kpts1 (1, N, 2)``
    pixels, ``desc0``, ``desc1``, ``size0``, ``size1`` ``(1, 2)`` = (W, H) -> ``matches (K, 2)`` int64, ``scores (K,)``."""
    import torch
    from kornia.feature.lightglue import filter_matches, normalize_keypoints

    nn = _nn()

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


def spsg_graph(superpoint, superglue):
    """SuperPoint + SuperGlue as one graph (seed 001's SPSG): grey ``image0``, ``image1`` ``(1, 1, H, W)`` ->
    ``mkpts0 (K, 2)``, ``mkpts1 (K, 2)``, ``confidence (K,)``.

    Same computation as :class:`cbir.models.superglue.SPSG`, with its two trace hazards removed: the keypoint
    budget is a sort then a slice (``topk(k)`` on fewer than ``k`` candidates fails in onnxruntime), and image and
    map sizes are tensors from the input's shape (``torch.tensor([w, h])`` would be frozen at export).
    """
    import torch
    import torch.nn.functional as F

    from ..models.superglue import log_optimal_transport, mutual_matches, normalize_keypoints
    from ..models.superpoint import max_pool_nms

    nn = _nn()

    class SPSGGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sp, self.sg = superpoint, superglue

        def detect(self, image):
            c = self.sp.conf
            prob, dense = self.sp.dense(image)
            prob = max_pool_nms(prob, int(c["nms_radius"]))[0]
            H, W = _hw(prob)
            b = int(c["remove_borders"])
            ys = torch.arange(H, device=prob.device)[:, None]
            xs = torch.arange(W, device=prob.device)[None, :]
            keep = prob > float(c["keypoint_threshold"])
            if b > 0:
                keep = keep & (ys >= b) & (ys < H - b) & (xs >= b) & (xs < W - b)
            yx = torch.nonzero(keep)
            scores = prob[yx[:, 0], yx[:, 1]]
            scores, order = torch.sort(scores, descending=True)
            k = int(c["max_keypoints"])
            if k >= 0:
                scores, order = scores[:k], order[:k]
            yx = yx.index_select(0, order)
            kpts = torch.stack([yx[:, 1], yx[:, 0]], 1).to(prob.dtype)
            # sample_descriptors with the map size as a tensor
            cell = 8
            dh, dw = _hw(dense)
            denom = torch.stack([dw.to(kpts.dtype) * cell - cell / 2 - 0.5, dh.to(kpts.dtype) * cell - cell / 2 - 0.5])
            grid = (kpts - cell / 2 + 0.5) / denom * 2 - 1
            d = F.grid_sample(dense, grid.view(1, 1, -1, 2), mode="bilinear", align_corners=True)
            d = F.normalize(d.reshape(1, dense.shape[1], -1), p=2, dim=1).transpose(1, 2)
            return kpts[None], scores[None], d

        def forward(self, image0, image1):
            k0, s0, d0 = self.detect(image0)
            k1, s1, d1 = self.detect(image1)
            h0, w0 = _hw(image0)
            h1, w1 = _hw(image1)
            size0 = torch.stack([w0, h0])[None].to(k0.dtype)
            size1 = torch.stack([w1, h1])[None].to(k1.dtype)
            sg = self.sg
            e0 = d0.transpose(1, 2) + sg.kenc(normalize_keypoints(k0, size0), s0)
            e1 = d1.transpose(1, 2) + sg.kenc(normalize_keypoints(k1, size1), s1)
            e0, e1 = sg.gnn(e0, e1)
            md0, md1 = sg.final_proj(e0), sg.final_proj(e1)
            sim = torch.einsum("bdn,bdm->bnm", md0, md1) / float(sg.conf["descriptor_dim"]) ** 0.5
            log_p = log_optimal_transport(sim, sg.bin_score, int(sg.conf["sinkhorn_iterations"]))
            m0, _, ms0, _ = mutual_matches(log_p[:, :-1, :-1], float(sg.conf["match_threshold"]))
            valid = torch.nonzero(m0[0] > -1)[:, 0]
            return (k0[0].index_select(0, valid), k1[0].index_select(0, m0[0].index_select(0, valid)),
                    ms0[0].index_select(0, valid))

    return SPSGGraph().eval()


def loftr_graph(net):
    """kornia ``LoFTR`` with tensor inputs and outputs: grey ``image0``, ``image1`` ``(1, 1, H, W)`` ->
    ``keypoints0 (K, 2)``, ``keypoints1 (K, 2)`` (LoFTR's frame: pixel centres at +0.5), ``confidence (K,)``."""
    nn = _nn()

    class LoFTRGraph(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, image0, image1):
            # the backbone on each image: kornia batches two images of one size, a branch tracing would freeze
            f0, f1 = self.net.extract_features(image0), self.net.extract_features(image1)
            out = self.net({"features0": f0, "features1": f1})
            return out["keypoints0"], out["keypoints1"], out["confidence"]

    return LoFTRGraph().eval()


# ----------------------------------------------------------------------------- specs per model


def _image_axes(*names: str) -> Dict[str, Dict[int, str]]:
    return {n: {0: "batch", 2: f"height{i or ''}", 3: f"width{i or ''}"} for i, n in enumerate(names)}


def pooled_spec(ext, name: Optional[str] = None) -> ExportSpec:
    """Spec of a built :class:`~cbir.extractors.pooled.PooledExtractor` (its conf, stages and weights)."""
    import torch

    if ":" in str(ext.conf["backbone"]):
        raise CbirError(f"backbone {ext.conf['backbone']!r} has no ONNX export (cbir exports its torch backbones: "
                        "xfeat, aliked-*, disk, mobilenet_v2, resnet*)")
    module = pooled_graph(ext)
    # a size that is no multiple of 32, so the padding the backbones add is traced (it is skipped at multiples)
    args = (_rand_image(250, 330),)
    return ExportSpec(
        name=name or f"pooled:{ext.conf['backbone']}", module=module, args=args,
        input_names=["image"], output_names=["descriptor"],
        dynamic_axes={**_image_axes("image"), "descriptor": {0: "batch"}},
        identity=pooled_identity(ext),
        check_args=[(torch.cat([_rand_image(300, 200, seed=1), _rand_image(300, 200, seed=2)]),), (_rand_image(256, 384, seed=3),)],
    )


def pooled_identity(ext) -> Dict[str, Any]:
    c = ext.conf
    return {"model": "pooled", "backbone": c["backbone"], "stages": list(ext.stages), "pool": c["pool"], "p": float(c["p"]),
            "backbone_conf": c.get("backbone_conf") or None, "weights": ext.weights()}


def _local_spec(name: str, module, identity: Dict[str, Any], outputs: List[str], out_axes: Dict[str, Dict[int, str]], outside: str,
                size=(250, 330)) -> ExportSpec:
    return ExportSpec(
        name=name, module=module, args=(_rand_image(*size),), input_names=["image"], output_names=outputs,
        dynamic_axes={**_image_axes("image"), **out_axes}, identity=identity, whole=False, outside=outside,
        check_args=[(_rand_image(300, 200, seed=1),), (_rand_image(256, 384, seed=2),)],
    )


def local_identity(ext) -> Dict[str, Any]:
    """What decides a local extractor's dense graph: its name, architecture variant and weight checksum."""
    from ..weights import file_sha256

    return {"model": f"local:{ext.name}", "variant": ext.conf.get("model"), "weights": file_sha256(ext.weights_path) if ext.weights_path else None}


def xfeat_spec(ext) -> ExportSpec:
    maps = {"feats": {0: "batch", 2: "h8", 3: "w8"}, "heatmap": {0: "batch", 2: "h32", 3: "w32"}, "reliability": {0: "batch", 2: "h8", 3: "w8"}}
    spec = _local_spec("local:xfeat", xfeat_dense(ext.net), local_identity(ext), list(maps), maps,
                       "before: bilinear resize to the sides floored to multiples of 32; after: NMS (5x5) over the heatmap, "
                       "threshold, top-k, score = heatmap x reliability, bicubic sampling of feats (kornia "
                       "XFeat.detectAndCompute around its network)", size=(224, 320))
    spec.check_args = [(_rand_image(288, 192, seed=1),), (_rand_image(256, 384, seed=2),)]
    return spec


def aliked_spec(ext) -> ExportSpec:
    maps = {"feature_map": {0: "batch", 2: "height", 3: "width"}, "score_map": {0: "batch", 2: "height", 3: "width"}}
    return _local_spec("local:aliked", aliked_dense(ext.net), local_identity(ext), list(maps), maps,
                       "keypoints: kornia's DKD (NMS, top-k or threshold, soft-argmax refinement); descriptors: the SDDH head "
                       "(deformable sampling, learned; kept in torch because the keypoint count is data-dependent)")


def disk_spec(ext) -> ExportSpec:
    maps = {"heatmap": {0: "batch", 2: "height", 3: "width"}, "descriptors": {0: "batch", 2: "height", 3: "width"}}
    return _local_spec("local:disk", disk_dense(ext.net), local_identity(ext), list(maps), maps,
                       "keypoints: kornia's heatmap_to_keypoints (NMS window, threshold, top-k); descriptors read at the keypoints")


def lightglue_identity(matcher) -> Dict[str, Any]:
    """What decides LightGlue's fixed graph: the architecture (widths, depth, heads), the filter threshold, the weights."""
    from ..weights import file_sha256

    c = matcher.net.conf
    arch = {k: getattr(c, k) for k in ("input_dim", "descriptor_dim", "n_layers", "num_heads", "add_scale_ori", "add_laf", "scale_coef")
            if hasattr(c, k)}
    return {"model": matcher.name, "features": matcher.features, "filter_threshold": float(c.filter_threshold), "arch": arch,
            "weights": file_sha256(matcher.weights_path)}


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


def spsg_spec(superpoint, superglue, identity: Dict[str, Any]) -> ExportSpec:
    args = (_rand_image(240, 320, 1), _rand_image(260, 300, 1, seed=1))
    axes = {"image0": {2: "height0", 3: "width0"}, "image1": {2: "height1", 3: "width1"},
            "mkpts0": {0: "k"}, "mkpts1": {0: "k"}, "confidence": {0: "k"}}
    return ExportSpec(name="superpoint+superglue", module=spsg_graph(superpoint, superglue), args=args,
                      input_names=["image0", "image1"], output_names=["mkpts0", "mkpts1", "confidence"], dynamic_axes=axes,
                      identity=identity, check_args=[(_rand_image(200, 256, 1, seed=2), _rand_image(240, 320, 1, seed=3))])


def _blocks_image(h: int, w: int, seed: int = 0):
    """A grey ``(1, 1, h, w)`` image of random rectangles on smooth noise: distinctive at LoFTR's 8-pixel cells."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = _rand_image(h, w, 1, seed=seed) * 0.5
    for _ in range(40):
        y0, x0 = int(torch.randint(0, h - 8, (1,), generator=g)), int(torch.randint(0, w - 8, (1,), generator=g))
        hh, ww = (int(v) for v in torch.randint(6, 40, (2,), generator=g))
        x[..., y0 : y0 + hh, x0 : x0 + ww] = float(torch.rand(1, generator=g))
    return x


def loftr_identity(net, variant: str, match_threshold: float, border_rm: int, weights_path) -> Dict[str, Any]:
    """What decides LoFTR's graph: the options baked in, ``temp_bug_fix`` (build_loftr derives it from the variant and
    the file name, not the file's content) and the weights."""
    from ..weights import file_sha256

    return {"model": "loftr", "conf": {"variant": variant, "match_threshold": float(match_threshold), "border_rm": int(border_rm)},
            "temp_bug_fix": bool(net.config["coarse"]["temp_bug_fix"]), "weights": file_sha256(weights_path)}


def loftr_spec(matcher_net, identity: Dict[str, Any]) -> ExportSpec:
    """The example pair must give coarse matches: tracing follows kornia's branch for "some matches" only then (an
    example without would freeze the empty branch). Tried in turn: a shifted copy, the image itself."""
    import torch

    x = _blocks_image(264, 352)
    a = x[..., :240, :320].contiguous()
    args = None
    for cand in ((a, x[..., 16:256, 24:344].contiguous()), (a, a.clone())):
        with torch.inference_mode():
            if int(matcher_net({"image0": cand[0], "image1": cand[1]})["confidence"].shape[0]) > 0:
                args = cand
                break
    if args is None:
        raise CbirError("loftr export: the example pairs gave no coarse match with these weights and match_threshold; "
                        "lower match_threshold for the export")
    axes = {"image0": {2: "height0", 3: "width0"}, "image1": {2: "height1", 3: "width1"},
            "keypoints0": {0: "k"}, "keypoints1": {0: "k"}, "confidence": {0: "k"}}
    return ExportSpec(name="loftr", module=loftr_graph(matcher_net), args=args, input_names=["image0", "image1"],
                      output_names=["keypoints0", "keypoints1", "confidence"], dynamic_axes=axes, identity=identity,
                      check_args=[(_rand_image(200, 256, 1, seed=2), _rand_image(224, 288, 1, seed=3))])


# ----------------------------------------------------------------------------- the registry


def _pooled_factory(backbone: str):
    def factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
        from ..extractors.pooled import PooledExtractor

        c = {k: v for k, v in (conf or {}).items() if k in ("stages", "pool", "p")}
        unknown = sorted(set(conf or {}) - {"stages", "pool", "p"})
        if unknown:
            raise CbirError(f"pooled export: unknown option(s) {unknown}; accepted: p, pool, stages")
        ext = PooledExtractor({"backbone": backbone, "weights": weights, **c})
        return pooled_spec(ext, name=f"pooled:{backbone}")

    return factory


def _local_factory(name: str, spec_fn):
    def factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
        from ..local import build_extractor

        return spec_fn(build_extractor(name, weights=weights, **(conf or {})))

    return factory


def _lightglue_factory(kind: str):
    def factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
        from ..local import build_matcher

        conf = dict(conf or {})
        features = conf.pop("features", "xfeat" if kind == "lighterglue" else "aliked")
        return lightglue_spec(build_matcher(kind, features=features, weights=matcher_weights or weights, **conf))

    return factory


def _spsg_factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
    """``--weights`` superpoint_v1.pth, ``--matcher-weights`` superglue_{variant}.pth (else ``$CBIR_WEIGHTS``)."""
    from ..models.superglue import WEIGHTS_FILES, load_superglue
    from ..models.superpoint import WEIGHTS_FILE, load_superpoint
    from ..weights import file_sha256, resolve_weights

    conf = dict(conf or {})
    sp_keys = ("max_keypoints", "keypoint_threshold", "nms_radius", "remove_borders")
    sg_keys = ("sinkhorn_iterations", "match_threshold")
    variant = conf.pop("variant", "outdoor")
    unknown = sorted(set(conf) - set(sp_keys) - set(sg_keys))
    if unknown:
        raise CbirError(f"superpoint+superglue export: unknown option(s) {unknown}; accepted: {sorted(sp_keys + sg_keys + ('variant',))}")
    sp_conf = {"max_keypoints": 1024, **{k: conf[k] for k in sp_keys if k in conf}}
    sg_conf = {k: conf[k] for k in sg_keys if k in conf}
    if variant not in WEIGHTS_FILES:
        raise CbirError(f"superglue variant must be one of {sorted(WEIGHTS_FILES)}, got {variant!r}")
    p_sp = resolve_weights(WEIGHTS_FILE, weights)
    p_sg = resolve_weights(WEIGHTS_FILES[variant], matcher_weights)
    sp, sg = load_superpoint(p_sp, sp_conf), load_superglue(p_sg, variant, sg_conf)
    ident = {"model": "superpoint+superglue", "superpoint": dict(sp.conf), "superglue": dict(sg.conf),
             "weights": {"superpoint": file_sha256(p_sp), "superglue": file_sha256(p_sg)}}
    return spsg_spec(sp, sg, ident)


def _loftr_factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
    from ..local.loftr import build_loftr

    conf = {"variant": "outdoor", "match_threshold": 0.2, "border_rm": 2, **(conf or {})}
    unknown = sorted(set(conf) - {"variant", "match_threshold", "border_rm"})
    if unknown:
        raise CbirError(f"loftr export: unknown option(s) {unknown}; accepted: border_rm, match_threshold, variant")
    net, path = build_loftr(matcher_weights or weights, conf["variant"], conf["match_threshold"], conf["border_rm"])
    return loftr_spec(net, loftr_identity(net, conf["variant"], conf["match_threshold"], conf["border_rm"], path))


def _register() -> None:
    from ..models.backbones import backbone_names

    for bb in backbone_names():
        f = _pooled_factory(bb)
        MODELS.register(f"pooled:{bb}")(f)
        MODELS.register(bb)(f)  # bare backbone names: the pooled descriptor
    MODELS.register("local:xfeat")(_local_factory("xfeat", xfeat_spec))
    MODELS.register("local:aliked")(_local_factory("aliked", aliked_spec))
    MODELS.register("local:aliked-n16rot")(_local_factory("aliked-n16rot", aliked_spec))
    MODELS.register("local:disk")(_local_factory("disk", disk_spec))
    MODELS.register("lightglue")(_lightglue_factory("lightglue"))
    MODELS.register("lighterglue")(_lightglue_factory("lighterglue"))
    MODELS.register("superpoint+superglue")(_spsg_factory)
    MODELS.register("spsg")(_spsg_factory)
    MODELS.register("loftr")(_loftr_factory)


_REGISTERED = False


def model_names() -> List[str]:
    global _REGISTERED
    if not _REGISTERED:
        _REGISTERED = True
        _register()
    return MODELS.names()


def build_spec(name: str, weights=None, conf: Optional[Dict[str, Any]] = None, matcher_weights=None) -> ExportSpec:
    """The export spec of model ``name`` (see :func:`model_names`), weights resolved offline."""
    model_names()
    return MODELS.get(name)(weights=weights, conf=conf, matcher_weights=matcher_weights)


# ----------------------------------------------------------------------------- export


def require_onnx() -> None:
    """Raise a clear error when the ``onnx`` extra is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise CbirError("ONNX export needs the onnx package: pip install 'cbir[onnx]'") from None


def write_onnx(spec: ExportSpec, out, opset: int = OPSET) -> Path:
    """Export ``spec`` to ``out`` (written atomically) with the legacy TorchScript exporter; returns the path."""
    import torch

    require_onnx()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=str(out.parent), prefix=f".{out.stem}.")
    os.close(fd)
    try:
        with warnings.catch_warnings(), torch.no_grad(), trace_safe(spec.module):
            warnings.simplefilter("ignore")  # tracer warnings about Python values: handled by the wrappers, checked after
            torch.onnx.export(spec.module, spec.args, tmp, input_names=spec.input_names, output_names=spec.output_names,
                              dynamic_axes=spec.dynamic_axes, opset_version=int(opset), dynamo=False, do_constant_folding=True)
        _write_metadata(tmp, spec, opset)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return out


def _write_metadata(path: str, spec: ExportSpec, opset: int) -> None:
    import onnx

    from .. import __version__

    m = onnx.load(path)
    meta = {"cbir_model": spec.name, "cbir_identity": json.dumps(spec.identity, sort_keys=True, default=str),
            "cbir_version": __version__, "cbir_whole": str(spec.whole).lower(), "cbir_outside": spec.outside, "cbir_opset": str(opset)}
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.producer_name = "cbir"
    onnx.save(m, path)


def check_onnx(spec: ExportSpec, path, threads: int = 0) -> Dict[str, Any]:
    """Run the exported graph and the torch module on the spec's inputs; per output the max abs difference and the
    relative one, ``||onnx - torch|| / ||torch||`` (L2 over the whole output: a scale-free number to compare with a
    tolerance, whatever the output's units).

    Outputs whose lengths differ (a keypoint or match count) are reported as counts instead.
    """
    import numpy as np
    import torch

    from ..runtime import Session

    sess = Session(path, threads=threads)
    report: Dict[str, Any] = {"inputs": [], "max_abs_diff": 0.0, "max_rel_diff": 0.0, "same_shapes": True}
    for args in [spec.args] + list(spec.check_args):
        with torch.inference_mode():
            ref = spec.module(*args)
        ref = ref if isinstance(ref, (tuple, list)) else (ref,)
        got = sess.run({n: a.numpy() for n, a in zip(spec.input_names, args)})
        row = {"shapes": [list(a.shape) for a in args], "outputs": {}}
        for name, r, g in zip(spec.output_names, ref, got):
            r = r.numpy()
            if r.shape != g.shape:
                row["outputs"][name] = {"torch_shape": list(r.shape), "onnx_shape": list(g.shape)}
                report["same_shapes"] = False
                continue
            r64, g64 = r.astype(np.float64), g.astype(np.float64)
            d = float(np.abs(r64 - g64).max()) if r.size else 0.0
            ref = float(np.linalg.norm(r64))
            rel = float(np.linalg.norm(r64 - g64)) / ref if ref > 0 else (0.0 if d == 0 else float("inf"))
            row["outputs"][name] = {"shape": list(g.shape), "max_abs_diff": d, "rel_diff": rel}
            report["max_abs_diff"] = max(report["max_abs_diff"], d)
            report["max_rel_diff"] = max(report["max_rel_diff"], rel)
        report["inputs"].append(row)
    return report


def export_model(name: str, out, weights=None, conf: Optional[Dict[str, Any]] = None, matcher_weights=None, opset: int = OPSET,
                 check: bool = True) -> Dict[str, Any]:
    """Export model ``name`` to ``out``; returns a JSON-able summary (and the parity check unless ``check=False``)."""
    if int(opset) < 16:
        raise CbirError(f"opset {opset}: cbir's graphs use grid_sample, which needs opset >= 16")
    t0 = time.time()
    spec = build_spec(name, weights=weights, conf=conf, matcher_weights=matcher_weights)
    t1 = time.time()
    path = write_onnx(spec, out, opset)
    info: Dict[str, Any] = {
        "model": spec.name, "out": str(path), "bytes": path.stat().st_size, "opset": int(opset), "whole": spec.whole,
        "outside": spec.outside, "inputs": spec.input_names, "outputs": spec.output_names,
        "dynamic_axes": spec.dynamic_axes, "identity": spec.identity,
        "seconds": {"build": round(t1 - t0, 3), "export": round(time.time() - t1, 3)},
    }
    if check:
        info["check"] = check_onnx(spec, path)
    return info


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
