"""Command-line options -> extractor confs: each kind places them (no if-chain), named confs, clear refusals."""

import pytest

from cbir.errors import CbirError
from cbir.extractors import CONFS, configure, make_extractor, names


def test_each_kind_places_the_backbone_options_itself():
    assert configure("pooled", backbone="aliked-n16", pool="max") == ("pooled", {"backbone": "aliked-n16", "pool": "max"})
    name, conf = configure("fused", backbone="xfeat")
    assert name == "fused" and [p["conf"].get("backbone") for p in conf["parts"] if p["name"] == "pooled"] == ["xfeat"]
    assert configure("hash", base="pooled", backbone="xfeat") == ("hash", {"base": "pooled", "base_conf": {"backbone": "xfeat"}})
    assert configure("semantic", head="h.h5") == ("semantic", {"head": "h.h5"})
    assert configure(None) == ("pooled", {"scales": [1.0, 0.707]})  # the default extractor with DEFAULT_CONF
    assert configure(None, scales=[1.0])[1]["scales"] == [1.0]  # an option given wins over DEFAULT_CONF
    assert "scales" not in configure(None, backbone="xfeat")[1]  # DEFAULT_CONF is the MobileNetV2 pipeline's


def test_build_without_an_extractor_is_the_cli_default():
    from cbir.build import resolve_extractor

    assert resolve_extractor(None).conf["scales"] == [1.0, 0.707]
    assert resolve_extractor(None, {"scales": [1.0]}).conf["scales"] == [1.0]
    assert resolve_extractor("pooled").conf["scales"] == [1.0]  # the extractor named explicitly: its own defaults
    assert resolve_extractor(None).key() == make_extractor(*configure(None)).key()


def test_a_jit_prefix_and_weights_are_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, conf = configure("pooled", backbone="paddle-jit:models/net", weights="w.pt")
    assert conf == {"backbone": f"paddle-jit:{tmp_path / 'models' / 'net'}", "weights": str(tmp_path / "w.pt")}


@pytest.mark.parametrize("args, words", [
    ({"name": "colour", "backbone": "xfeat"}, "no backbone options"),
    ({"name": "vlad", "pool": "gem"}, "no backbone options"),
    ({"name": "pooled", "head": "h.h5"}, "--head is only for --extractor semantic"),
    ({"name": "pooled", "base": "fused"}, "--base is only for --extractor hash"),
    ({"name": "semantic"}, "needs --head"),
    ({"name": "semantic", "head": "h.h5", "backbone": "xfeat"}, "takes its backbone from the head"),
    ({"name": "mnv2-gap", "pool": "max"}, "named configuration"),
    ({"name": "nope"}, "mnv2-gap"),  # the refusal lists the named confs too
])
def test_options_an_extractor_cannot_take_are_refused(args, words):
    with pytest.raises(CbirError, match=words):
        configure(**args)


def test_named_confs_resolve_to_an_extractor_and_build():
    assert set(CONFS) <= set(names())
    for name, entry in CONFS.items():
        kind, conf = configure(name)
        assert kind == entry["extractor"] and conf == entry["conf"]
        conf["mutated"] = True  # the caller's copy: the table itself is unchanged
        assert "mutated" not in CONFS[name]["conf"]
    ext = make_extractor(*configure("mnv2-gap-ms"))
    assert ext.conf["scales"] == [1.0, 0.707] and ext.conf["pool"] == "gap" and ext.dim == 1280
    assert configure("aliked-gem", extra={"flip": False})[1] == {"backbone": "aliked-n16", "flip": False}
