"""ONNX export of cbir's networks: :func:`export_model`, the entry point of ``cbir export onnx``.

Where the pieces live: :mod:`cbir.export.models` (one module per model: its graph, spec and factory, registered in
:data:`~cbir.export.models.MODELS` by name), :mod:`cbir.export.patches` (the trace-safe kornia and torch forwards
swapped in during an export), :mod:`cbir.export.spec` (:class:`ExportSpec`, the opset, example inputs) and
:mod:`cbir.export.write` (writing the file, checking it against torch). The names below are re-exported here.

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

import time
from typing import Any, Dict, Optional

from ..errors import CbirError
from .models import MODELS, build_spec, model_names
from .patches import trace_safe
from .spec import EXPORT_FORMAT, OPSET, ExportSpec
from .write import check_onnx, require_onnx, safe_name, write_onnx

__all__ = ["EXPORT_FORMAT", "OPSET", "ExportSpec", "MODELS", "build_spec", "model_names", "trace_safe", "check_onnx",
           "require_onnx", "safe_name", "write_onnx", "export_model"]


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
