"""``cbir train``: fit a semantic head."""

from __future__ import annotations

import json

from ..cliutil import non_negative_int, positive_int
from ..errors import CbirError

from .common import (add_common, add_source, add_extractor, extractor_from_args, entries_from_args)


def cmd_train(a) -> int:
    from ..engine import train_head

    if a.extractor in ("hash", "semantic", "vlad"):
        raise CbirError(f"the head's base must be a float extractor without a gallery codebook (fused, pooled, colour), not {a.extractor}")
    from ..extractors import HEAD_BASE_PARTS

    if a.extractor is None:  # the head's own default base (measured for heads, README "Descriptors"), not the index default
        a.extractor = "fused"
    name, conf = extractor_from_args(a, fused_parts=HEAD_BASE_PARTS if a.extractor == "fused" else None)
    entries, ds, label_names = entries_from_args(a)
    rep = train_head(entries, a.out, base=name, base_conf=conf, epochs=a.epochs, hidden=a.hidden, flip=not a.no_flip,
                     progress=not a.quiet, workers=a.workers, label_names=label_names)
    if a.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"head written to {rep['out']}: {len(rep['classes'])} classes, {rep['images']} images, "
              f"train accuracy {rep['train_accuracy']:.3f} ({rep['seconds_extract']} s extract, {rep['seconds_fit']} s fit)")
    return 0


def register(sub, add_common=None) -> None:
    """Add this module's sub-command(s) to the main parser."""
    t = sub.add_parser("train", help="fit a semantic (softmax) head on a labelled list",
                       description="Transfer learning as seed 003's model was made: extract frozen base descriptors of a labelled list "
                                   "(with horizontally flipped copies) and fit a softmax classifier head; `index build --extractor semantic --head FILE` uses it.")
    add_source(t)
    add_extractor(t, "base descriptor the head reads")
    t.add_argument("--out", required=True, metavar="PATH", help="head file to write (HDF5)")
    t.add_argument("--epochs", type=positive_int, default=300, help="full-batch Adam steps (default: %(default)s)")
    t.add_argument("--hidden", type=non_negative_int, default=0, help="hidden units of a one-layer MLP head (default 0: linear softmax)")
    t.add_argument("--no-flip", action="store_true", help="do not add mirrored copies of the training images")
    t.add_argument("--batch-size", type=positive_int, default=16)
    t.add_argument("--workers", type=non_negative_int, default=2, help="image decoding threads (0: decode in the main thread)")
    t.add_argument("--json", action="store_true", help="print the training summary as JSON")
    add_common(t)
    t.set_defaults(func=cmd_train)
