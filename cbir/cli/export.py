"""``cbir export onnx``: write one of cbir's networks as an ONNX file (opset 17, dynamic sizes and point counts).

    cbir export onnx --model xfeat --out xfeat.onnx                    # the pooled descriptor of XFeat's CNN
    cbir export onnx --model aliked-n16 --conf pool=gap --out a.onnx
    cbir export onnx --model resnet50 --weights resnet50.pth --out r50.onnx
    cbir export onnx --model local:aliked --out aliked_dense.onnx      # dense maps; detection stays outside
    cbir export onnx --model lightglue --conf features=disk --out lg_disk.onnx
    cbir export onnx --model superpoint+superglue --weights superpoint_v1.pth --matcher-weights superglue_outdoor.pth --out spsg.onnx
    cbir export onnx --model loftr --weights outdoor_ds.ckpt --out loftr.onnx
    cbir export onnx --list

Registered by ``cbir.cli`` through :func:`register`.
"""

from __future__ import annotations

import argparse
import json
from typing import Callable


def register(sub, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    from ..cliutil import int_at_least

    e = sub.add_parser("export", help="export cbir's networks for deployment without PyTorch (ONNX)",
                       description="Export cbir's networks. See README 'ONNX' for what each graph holds.")
    esub = e.add_subparsers(dest="export_command", metavar="FORMAT")
    esub.required = True
    o = esub.add_parser(
        "onnx", help="write an ONNX model (opset >= 16; dynamic batch, image sizes and point counts)",
        description="Export a model to ONNX with the TorchScript exporter, then run it in onnxruntime against torch on example "
                    "inputs (another image size included) and print the largest difference. Models: a backbone name (the whole "
                    "pooled descriptor: backbone + GeM + per-stage L2 + concat + L2), local:xfeat / local:aliked / local:disk "
                    "(dense maps; keypoint selection stays outside), lightglue, lighterglue, superpoint+superglue, loftr.")
    o.add_argument("--model", metavar="NAME", help="model to export (see --list)")
    o.add_argument("--out", metavar="FILE.onnx", help="file to write (replaced atomically)")
    o.add_argument("--weights", metavar="PATH", help="weight file (backbone, local features, superpoint_v1.pth, LoFTR .ckpt); default: found offline")
    o.add_argument("--matcher-weights", metavar="PATH", help="superpoint+superglue: superglue_{indoor,outdoor}.pth; lightglue: its .pth")
    o.add_argument("--conf", nargs="*", metavar="KEY=VALUE", help="options baked into the graph, e.g. pool=gap p=3 stages='[\"block3\"]' "
                   "(pooled), features=disk (lightglue), max_keypoints=1024 match_threshold=0.2 variant=indoor (superpoint+superglue)")
    o.add_argument("--opset", type=int_at_least(16, "an ONNX opset >= 16 (grid_sample needs it)"), default=17, help="ONNX opset (>= 16; default: %(default)s)")
    o.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check after export")
    o.add_argument("--json", action="store_true", help="print the export summary as JSON")
    o.add_argument("--list", action="store_true", help="list the exportable models and exit")
    add_common(o)
    o.set_defaults(func=cmd_export_onnx)


def cmd_export_onnx(a) -> int:
    from ..errors import CbirError
    from .match import parse_options
    from ..export.onnx import export_model, model_names

    if a.list:
        names = model_names()
        print("models:", ", ".join(names))
        print("bare backbone names are the pooled descriptor (pooled:NAME); resnet* need --weights (mobilenet_v2 finds its ImageNet weights offline)")
        return 0
    if not a.model or not a.out:
        raise CbirError("cbir export onnx needs --model NAME and --out FILE.onnx (or --list)")
    info = export_model(a.model, a.out, weights=a.weights, conf=parse_options(a.conf, "--conf") or None,
                        matcher_weights=a.matcher_weights, opset=a.opset, check=not a.no_check)
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"{info['model']} -> {info['out']} ({info['bytes'] / 1e6:.1f} MB, opset {info['opset']}, "
          f"export {info['seconds']['export']} s)")
    print(f"  inputs {', '.join(info['inputs'])} -> outputs {', '.join(info['outputs'])}")
    if not info["whole"]:
        print(f"  outside the graph: {info['outside']}")
    chk = info.get("check")
    if chk:
        shapes = "; ".join(" + ".join("x".join(str(d) for d in s) for s in row["shapes"]) for row in chk["inputs"])
        print(f"  onnxruntime vs torch on {shapes}: max abs difference {chk['max_abs_diff']:.3g}"
              + ("" if chk["same_shapes"] else " (some outputs differ in length: see --json)"))
    return 0
