"""SuperGlue (Sarlin et al., CVPR 2020), written from its published structure, plus the seed-001 ``SPSG`` pipeline.

Parameter names follow the official ``superglue_indoor.pth`` / ``superglue_outdoor.pth``: ``kenc.encoder.*`` (keypoint
MLP 3 -> 32 -> 64 -> 128 -> 256 -> 256 with BatchNorm), ``gnn.layers.{0..17}.attn.{merge,proj.0-2}`` and
``gnn.layers.*.mlp.{0,1,3}`` (9 self / cross pairs, 4 heads), ``final_proj`` and the dustbin ``bin_score``. The
weights are Magic Leap's (non-commercial) and are not shipped: load them from a user path (:func:`load_superglue`).

Every ``forward`` takes and returns tensors only (no dicts), so the modules can be traced for ONNX.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .superpoint import SuperPoint

DEFAULT_CONF: Dict[str, Any] = {
    "descriptor_dim": 256,
    "keypoint_encoder": [32, 64, 128, 256],
    "gnn_layers": ["self", "cross"] * 9,
    "num_heads": 4,
    "sinkhorn_iterations": 100,
    "match_threshold": 0.2,
}

WEIGHTS_FILES = {"indoor": "superglue_indoor.pth", "outdoor": "superglue_outdoor.pth"}


def conv_mlp(channels: List[int], batch_norm: bool = True) -> nn.Sequential:
    """1x1 Conv1d stack; BatchNorm + ReLU after every layer but the last (whose bias starts at 0)."""
    layers: List[nn.Module] = []
    for i in range(1, len(channels)):
        layers.append(nn.Conv1d(channels[i - 1], channels[i], kernel_size=1, bias=True))
        if i < len(channels) - 1:
            if batch_norm:
                layers.append(nn.BatchNorm1d(channels[i]))
            layers.append(nn.ReLU())
    nn.init.constant_(layers[-1].bias, 0.0)
    return nn.Sequential(*layers)


def normalize_keypoints(kpts: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """``(B, N, 2)`` pixels -> centred and divided by 0.7 * the longer side; ``size`` is ``(B, 2)`` = (W, H)."""
    size = size.to(kpts)
    center = size / 2
    scaling = size.max(dim=1, keepdim=True).values * 0.7
    return (kpts - center[:, None, :]) / scaling[:, None, :]


class KeypointEncoder(nn.Module):
    """Embeds ``(x, y, score)`` into the descriptor space."""

    def __init__(self, feature_dim: int, layers: List[int]) -> None:
        super().__init__()
        self.encoder = conv_mlp([3] + list(layers) + [feature_dim])

    def forward(self, kpts: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.encoder(torch.cat([kpts.transpose(1, 2), scores.unsqueeze(1)], dim=1))


class MultiHeadedAttention(nn.Module):
    """Multi-head attention over ``(B, C, N)`` tensors; channel ``c`` belongs to head ``c % heads`` (official layout)."""

    def __init__(self, num_heads: int, d_model: int) -> None:
        super().__init__()
        assert d_model % num_heads == 0
        self.dim = d_model // num_heads
        self.num_heads = num_heads
        self.merge = nn.Conv1d(d_model, d_model, kernel_size=1)
        self.proj = nn.ModuleList([copy.deepcopy(self.merge) for _ in range(3)])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        b = query.shape[0]
        q, k, v = (p(x).view(b, self.dim, self.num_heads, -1) for p, x in zip(self.proj, (query, key, value)))
        logits = torch.einsum("bdhn,bdhm->bhnm", q, k) / self.dim**0.5
        x = torch.einsum("bhnm,bdhm->bdhn", logits.softmax(dim=-1), v)
        return self.merge(x.contiguous().view(b, self.dim * self.num_heads, -1))


class AttentionalPropagation(nn.Module):
    """Message passing: attend from ``x`` to ``source``, then an MLP on ``[x, message]`` gives the update."""

    def __init__(self, feature_dim: int, num_heads: int) -> None:
        super().__init__()
        self.attn = MultiHeadedAttention(num_heads, feature_dim)
        self.mlp = conv_mlp([feature_dim * 2, feature_dim * 2, feature_dim])

    def forward(self, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([x, self.attn(x, source, source)], dim=1))


class AttentionalGNN(nn.Module):
    """Alternating self- and cross-attention layers with residual updates."""

    def __init__(self, feature_dim: int, layer_names: List[str], num_heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([AttentionalPropagation(feature_dim, num_heads) for _ in layer_names])
        self.names = list(layer_names)

    def forward(self, desc0: torch.Tensor, desc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        for layer, name in zip(self.layers, self.names):
            src0, src1 = (desc1, desc0) if name == "cross" else (desc0, desc1)
            delta0, delta1 = layer(desc0, src0), layer(desc1, src1)
            desc0, desc1 = desc0 + delta0, desc1 + delta1
        return desc0, desc1


def log_sinkhorn(couplings: torch.Tensor, log_mu: torch.Tensor, log_nu: torch.Tensor, iters: int) -> torch.Tensor:
    """Sinkhorn normalisation in log space: ``couplings + u + v`` with row marginals ``mu`` and column marginals ``nu``."""
    u, v = torch.zeros_like(log_mu), torch.zeros_like(log_nu)
    for _ in range(iters):
        u = log_mu - torch.logsumexp(couplings + v.unsqueeze(1), dim=2)
        v = log_nu - torch.logsumexp(couplings + u.unsqueeze(2), dim=1)
    return couplings + u.unsqueeze(2) + v.unsqueeze(1)


def log_optimal_transport(scores: torch.Tensor, alpha: torch.Tensor, iters: int) -> torch.Tensor:
    """Partial assignment with a dustbin row and column scored ``alpha``; returns ``(B, M+1, N+1)`` log-probabilities."""
    b, m, n = scores.shape
    one = scores.new_tensor(1)
    ms, ns = (m * one).to(scores), (n * one).to(scores)
    bins0 = alpha.expand(b, m, 1)
    bins1 = alpha.expand(b, 1, n)
    corner = alpha.expand(b, 1, 1)
    couplings = torch.cat([torch.cat([scores, bins0], -1), torch.cat([bins1, corner], -1)], 1)
    norm = -(ms + ns).log()
    log_mu = torch.cat([norm.expand(m), ns.log()[None] + norm])
    log_nu = torch.cat([norm.expand(n), ms.log()[None] + norm])
    log_mu, log_nu = log_mu[None].expand(b, -1), log_nu[None].expand(b, -1)
    return log_sinkhorn(couplings, log_mu, log_nu, iters) - norm


class SuperGlue(nn.Module):
    """SuperGlue matcher.

    ``forward(kpts0, kpts1, desc0, desc1, scores0, scores1, size0, size1)`` takes ``(B, N, 2)`` pixel keypoints,
    ``(B, N, D)`` descriptors, ``(B, N)`` scores and ``(B, 2)`` image sizes ``(W, H)``; it returns
    ``matches0 (B, M)``, ``matches1 (B, N)`` (index of the match or -1) and their scores ``mscores0``, ``mscores1``.
    """

    def __init__(self, conf: Optional[Dict[str, Any]] = None) -> None:
        super().__init__()
        self.conf = {**DEFAULT_CONF, **(conf or {})}
        d = int(self.conf["descriptor_dim"])
        self.kenc = KeypointEncoder(d, list(self.conf["keypoint_encoder"]))
        self.gnn = AttentionalGNN(d, list(self.conf["gnn_layers"]), int(self.conf["num_heads"]))
        self.final_proj = nn.Conv1d(d, d, kernel_size=1, bias=True)
        self.register_parameter("bin_score", nn.Parameter(torch.tensor(1.0)))

    def forward(
        self,
        kpts0: torch.Tensor,
        kpts1: torch.Tensor,
        desc0: torch.Tensor,
        desc1: torch.Tensor,
        scores0: torch.Tensor,
        scores1: torch.Tensor,
        size0: torch.Tensor,
        size1: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        b, m, n = kpts0.shape[0], kpts0.shape[1], kpts1.shape[1]
        if m == 0 or n == 0:
            return (
                kpts0.new_full((b, m), -1, dtype=torch.long),
                kpts1.new_full((b, n), -1, dtype=torch.long),
                kpts0.new_zeros((b, m)),
                kpts1.new_zeros((b, n)),
            )
        return self.match(kpts0, kpts1, desc0, desc1, scores0, scores1, size0, size1)

    def match(
        self,
        kpts0: torch.Tensor,
        kpts1: torch.Tensor,
        desc0: torch.Tensor,
        desc1: torch.Tensor,
        scores0: torch.Tensor,
        scores1: torch.Tensor,
        size0: torch.Tensor,
        size1: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`forward` on keypoint sets that are not empty: keypoint encoding, the attentional GNN, Sinkhorn with
        a dustbin, mutual matches above ``match_threshold``. Tensors only and no branch on a size, so the ONNX export
        (:mod:`cbir.export.models.spsg`) traces this very code; ``forward`` adds the empty case."""
        d0 = desc0.transpose(1, 2) + self.kenc(normalize_keypoints(kpts0, size0), scores0)
        d1 = desc1.transpose(1, 2) + self.kenc(normalize_keypoints(kpts1, size1), scores1)
        d0, d1 = self.gnn(d0, d1)
        md0, md1 = self.final_proj(d0), self.final_proj(d1)
        sim = torch.einsum("bdn,bdm->bnm", md0, md1) / float(self.conf["descriptor_dim"]) ** 0.5
        log_p = log_optimal_transport(sim, self.bin_score, int(self.conf["sinkhorn_iterations"]))
        return mutual_matches(log_p[:, :-1, :-1], float(self.conf["match_threshold"]))


def mutual_matches(log_p: torch.Tensor, threshold: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual arg-max of the assignment (without dustbins) whose probability exceeds ``threshold``."""
    max0, max1 = log_p.max(2), log_p.max(1)
    idx0, idx1 = max0.indices, max1.indices
    ar0 = torch.arange(idx0.shape[1], device=log_p.device)[None]
    ar1 = torch.arange(idx1.shape[1], device=log_p.device)[None]
    mutual0 = ar0 == idx1.gather(1, idx0)
    mutual1 = ar1 == idx0.gather(1, idx1)
    zero = log_p.new_tensor(0)
    ms0 = torch.where(mutual0, max0.values.exp(), zero)
    ms1 = torch.where(mutual1, ms0.gather(1, idx1), zero)
    valid0 = mutual0 & (ms0 > threshold)
    valid1 = mutual1 & valid0.gather(1, idx1)
    m0 = torch.where(valid0, idx0, torch.full_like(idx0, -1))
    m1 = torch.where(valid1, idx1, torch.full_like(idx1, -1))
    return m0, m1, ms0, ms1


class SPSG(nn.Module):
    """SuperPoint + SuperGlue as one module (seed 001): ``forward(x1, x2) -> (mkpts0, mkpts1, confidence)``.

    ``x1``, ``x2`` are grey ``(1, 1, H, W)`` images in ``[0, 1]``; the outputs are ``(M, 2)`` matched pixel
    keypoints of each image and ``(M,)`` match confidences. Tensor-only inputs and outputs (ONNX-friendly).
    """

    def __init__(self, superpoint: Optional[SuperPoint] = None, superglue: Optional[SuperGlue] = None) -> None:
        super().__init__()
        self.superpoint = superpoint if superpoint is not None else SuperPoint({"max_keypoints": 1024})
        self.superglue = superglue if superglue is not None else SuperGlue()

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k0, s0, d0 = self.superpoint(x1)
        k1, s1, d1 = self.superpoint(x2)
        size0 = torch.tensor([[x1.shape[-1], x1.shape[-2]]], dtype=k0.dtype, device=k0.device)
        size1 = torch.tensor([[x2.shape[-1], x2.shape[-2]]], dtype=k1.dtype, device=k1.device)
        m0, _, ms0, _ = self.superglue(k0, k1, d0, d1, s0, s1, size0, size1)
        return matched_points(k0, k1, m0, ms0)


def matched_points(kpts0: torch.Tensor, kpts1: torch.Tensor, matches0: torch.Tensor,
                   mscores0: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The matched keypoints of the first pair of a batch: ``(K, 2)`` of each image and the ``(K,)`` match scores,
    from :meth:`SuperGlue.forward`'s ``matches0`` and ``mscores0`` (used by :class:`SPSG` and its ONNX export)."""
    valid = torch.nonzero(matches0[0] > -1)[:, 0]
    return (kpts0[0].index_select(0, valid), kpts1[0].index_select(0, matches0[0].index_select(0, valid)),
            mscores0[0].index_select(0, valid))


def load_superglue(path: Optional[os.PathLike] = None, weights: str = "outdoor", conf: Optional[Dict[str, Any]] = None) -> SuperGlue:
    """SuperGlue with weights from ``path`` (else ``$CBIR_WEIGHTS/superglue_{weights}.pth``), loaded strictly, eval mode."""
    from ..errors import CbirError
    from ..weights import load_into, load_state_dict, resolve_weights

    if weights not in WEIGHTS_FILES:
        raise CbirError(f"SuperGlue weights must be one of {sorted(WEIGHTS_FILES)}, got {weights!r}")
    p = resolve_weights(WEIGHTS_FILES[weights], path)
    net = SuperGlue(conf)
    # a BatchNorm counter, absent from checkpoints saved before PyTorch 0.4.1; never read in eval mode
    load_into(net, load_state_dict(p), p, allow_missing=("num_batches_tracked",))
    return net.eval()
