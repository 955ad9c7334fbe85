"""What the dense-map exports of local features (:mod:`.xfeat`, :mod:`.aliked`, :mod:`.disk`) share: their spec,
their identity and their factory. Their graphs stop at the dense maps; keypoint selection and descriptor sampling
stay outside, in torch with kornia's own code (:mod:`cbir.export.runtime`).
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..spec import ExportSpec, image_axes, rand_image


def local_spec(name: str, module, identity: Dict[str, Any], outputs: List[str], out_axes: Dict[str, Dict[int, str]], outside: str,
                size=(250, 330)) -> ExportSpec:
    """The spec of a dense-map graph of a local extractor: one image in (dynamic batch and size), maps out."""
    return ExportSpec(
        name=name, module=module, args=(rand_image(*size),), input_names=["image"], output_names=outputs,
        dynamic_axes={**image_axes("image"), **out_axes}, identity=identity, whole=False, outside=outside,
        check_args=[(rand_image(300, 200, seed=1),), (rand_image(256, 384, seed=2),)],
    )


def local_identity(ext) -> Dict[str, Any]:
    """What decides a local extractor's dense graph: its name, architecture variant and weight checksum."""
    from ...weights import cached_sha256

    return {"model": f"local:{ext.name}", "variant": ext.conf.get("model"), "weights": cached_sha256(ext.weights_path) if ext.weights_path else None}


def local_factory(name: str, spec_fn):
    """The factory of ``local:NAME``: the extractor built with ``--weights`` and ``--conf``, then ``spec_fn`` of it."""
    def factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec:
        from ...local import build_extractor

        return spec_fn(build_extractor(name, weights=weights, **(conf or {})))

    return factory
