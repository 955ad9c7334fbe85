"""Writing an :class:`~cbir.export.spec.ExportSpec` as an ONNX file, and checking the file against torch.

:func:`write_onnx` runs the legacy TorchScript exporter (``dynamo=False``, see :mod:`cbir.export.onnx`) with the
trace-safe forwards of :mod:`cbir.export.patches` swapped in, writes cbir's metadata and replaces the file atomically;
:func:`check_onnx` runs the file in onnxruntime and the spec's module in torch on the spec's example inputs.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict

from ..errors import CbirError
from .patches import trace_safe
from .spec import OPSET, ExportSpec


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


def safe_name(name: str) -> str:
    """``name`` with every run of characters unsafe in a file name replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
