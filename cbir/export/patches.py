"""Trace-safe forwards swapped into kornia's and torch's modules for the duration of an export (:func:`trace_safe`).

The legacy TorchScript exporter records tensor operations and freezes Python numbers: each forward below computes
what the original computes, with sizes taken from tensors (:func:`hw`), explicit-rank reshapes and positive dims where
the exporter mis-ranks, and float64 statistics where onnxruntime's float32 reductions drift. The torch path never sees
them (they are removed after the export), and every export is checked against torch (:func:`cbir.export.write.check_onnx`).
"""

from __future__ import annotations

import contextlib
import types


def hw(x):
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

    h, w = hw(x)
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
        from kornia.feature.lightglue import CrossBlock, LearnableFourierPositionalEncoding, MatchAssignment, SelfBlock

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
