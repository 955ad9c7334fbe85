"""``cbir convert paddle-to-torch``: a Paddle-trained MobileNetV2 as a torch state dict for ``--backbone mobilenet_v2``.

Reading a ``.pdparams`` needs no Paddle (cbir unpickles arrays only); the parity check and jit prefixes do.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable


def cmd_paddle_to_torch(a) -> int:
    import torch

    from ..errors import CbirError
    from ..models.paddle import paddle_to_torch_state, torch_parity

    state, info = paddle_to_torch_state(a.weights)
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = f"{out}.partial"
    torch.save(state, tmp)
    os.replace(tmp, out)
    info["out"] = out
    if a.check != "no":
        import importlib.util

        try:
            have_paddle = importlib.util.find_spec("paddle") is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules
            have_paddle = False
        if not have_paddle:
            if a.check == "yes":
                raise CbirError("--check needs PaddlePaddle to run the original model: pip install 'cbir[paddle]'")
        else:
            images = None
            if a.check_images:
                from ..data import decode_image

                images = [decode_image(p) for p in a.check_images]
            info["parity"] = torch_parity(a.weights, state, images)
    if a.json:
        print(json.dumps(info, indent=2))
    else:
        head = f"{info['num_classes']}-class classifier" if info["num_classes"] else "no classifier (features only)"
        print(f"{out}: {info['tensors']} tensors, MobileNetV2 with {head}; use --backbone mobilenet_v2 --weights {out}")
        if "parity" in info:
            print("parity with Paddle (max relative difference): " + ", ".join(f"{k} {v:.2e}" for k, v in info["parity"].items()))
    return 0


def register(sub, add_common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``convert paddle-to-torch`` to the main parser's sub-parsers."""
    c = sub.add_parser("convert", help="convert model weights between frameworks",
                       description="Convert weights trained elsewhere into what cbir's own networks load.")
    csub = c.add_subparsers(dest="convert_cmd", required=True, metavar="KIND")
    p = csub.add_parser(
        "paddle-to-torch",
        help="Paddle MobileNetV2 (.pdparams) -> torch state dict for --backbone mobilenet_v2",
        description="Convert a paddle.vision MobileNetV2 state dict (paddle.save(model.state_dict(), 'model.pdparams'), any number "
        "of classes, or none) to the state dict of cbir's torch MobileNetV2 (torchvision keys: BN _mean/_variance -> "
        "running_mean/running_var, Linear weights transposed). Then: cbir index build --backbone mobilenet_v2 --weights OUT "
        "(pooled; add --conf '{\"input_size\": [227, 227], \"stages\": [\"last\"], \"max_side\": null}' --pool gap for the "
        "seed's features) or --extractor semantic --backbone mobilenet_v2 --weights OUT (its softmax). No Paddle needed, "
        "except for --check and for a paddle.jit.save prefix.",
    )
    p.add_argument("--weights", required=True, metavar="PDPARAMS", help="the Paddle state dict (.pdparams) or a paddle.jit.save prefix")
    p.add_argument("--out", required=True, metavar="PTH", help="where to write the torch state dict")
    p.add_argument("--check", choices=["auto", "yes", "no"], default="auto",
                   help="compare the features of both models (auto: when Paddle is installed; default: %(default)s)")
    p.add_argument("--check-images", nargs="+", metavar="IMG", help="images for --check (default: two random ones)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_common(p)
    p.set_defaults(func=cmd_paddle_to_torch)
