"""The per-model export modules (cbir/export/models) in torch: no onnx needed."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_spsg_graph_runs_superglue_match_and_gives_spsg_outputs(monkeypatch):
    """The SuperPoint+SuperGlue graph matches with SuperGlue.match, the method SuperGlue.forward runs (no copy of it):
    in torch its outputs are SPSG's, bit for bit, and a patched match is what the graph calls."""
    from cbir.export.models.spsg import spsg_graph
    from cbir.models.superglue import SPSG, SuperGlue
    from cbir.models.superpoint import SuperPoint

    torch.manual_seed(0)
    sp = SuperPoint({"max_keypoints": 64, "keypoint_threshold": 0.0}).eval()
    sg = SuperGlue({"sinkhorn_iterations": 5, "match_threshold": 0.0}).eval()
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.rand(1, 1, 64, 80, generator=g), torch.rand(1, 1, 72, 64, generator=g)
    graph = spsg_graph(sp, sg)
    with torch.inference_mode():
        ref = SPSG(sp, sg).eval()(x0, x1)
        got = graph(x0, x1)
    assert len(ref[0]) > 0
    for r, o in zip(ref, got):
        assert r.shape == o.shape and torch.equal(r, o)

    calls = []
    real = SuperGlue.match

    def spy(self, *args):
        calls.append(len(args))
        return real(self, *args)

    monkeypatch.setattr(SuperGlue, "match", spy)
    with torch.inference_mode():
        graph(x0, x1)
        SPSG(sp, sg).eval()(x0, x1)
    assert calls == [8, 8]  # once by the graph, once by the torch module's forward


def test_every_model_module_registers_its_names():
    from cbir.export.models import model_names
    from cbir.models.backbones import backbone_names

    names = set(model_names())
    fixed = {"local:xfeat", "local:aliked", "local:aliked-n16rot", "local:disk", "lightglue", "lighterglue",
             "superpoint+superglue", "spsg", "loftr"}
    assert fixed <= names
    assert names - fixed == {f"pooled:{b}" for b in backbone_names()} | set(backbone_names())
