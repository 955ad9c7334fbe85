"""SuperGlue internals and the seed-001 SPSG module (random weights: structure, not accuracy)."""

from __future__ import annotations

import torch

from cbir.models.superglue import SPSG, SuperGlue, log_optimal_transport, mutual_matches
from cbir.models.superpoint import SuperPoint, max_pool_nms


def test_optimal_transport_marginals():
    torch.manual_seed(0)
    m, n = 7, 5
    log_p = log_optimal_transport(torch.randn(2, m, n), torch.tensor(0.5), iters=200)
    p = log_p.exp()
    assert p.shape == (2, m + 1, n + 1)
    # Sinkhorn after 200 iterations: each marginal within 1e-4 of its target (rows 1, the dustbin row n), relative
    torch.testing.assert_close(p[:, :m].sum(2), torch.ones(2, m), rtol=1e-4, atol=0)
    torch.testing.assert_close(p[:, :, :n].sum(1), torch.ones(2, n), rtol=1e-4, atol=0)
    torch.testing.assert_close(p[:, m].sum(1), torch.full((2,), float(n)), rtol=1e-4, atol=0)


def test_mutual_matches_threshold():
    p = torch.tensor([[[0.9, 0.05], [0.6, 0.3]]]).log()
    m0, m1, s0, s1 = mutual_matches(p, 0.2)
    assert m0.tolist() == [[0, -1]] and m1.tolist() == [[0, -1]]
    assert abs(float(s0[0, 0]) - 0.9) < 1e-6 and float(s1[0, 1]) == 0.0


def test_nms_keeps_isolated_maxima():
    s = torch.zeros(1, 20, 20)
    s[0, 5, 5], s[0, 6, 6], s[0, 15, 15] = 1.0, 0.5, 0.7
    kept = max_pool_nms(s, 2)
    assert kept[0, 5, 5] == 1.0 and kept[0, 6, 6] == 0.0 and kept[0, 15, 15] == 0.7


def test_spsg_is_tensor_only():
    torch.manual_seed(0)
    model = SPSG(SuperPoint({"max_keypoints": 64}), SuperGlue({"sinkhorn_iterations": 5, "match_threshold": 0.0})).eval()
    x1, x2 = torch.rand(1, 1, 64, 80), torch.rand(1, 1, 72, 64)
    with torch.inference_mode():
        mk0, mk1, conf = model(x1, x2)
    assert isinstance(mk0, torch.Tensor) and mk0.shape[1] == 2 and mk0.shape == mk1.shape and conf.shape == (mk0.shape[0],)
    assert (mk0[:, 0] < 80).all() and (mk1[:, 1] < 72).all()
