"""Command line: a sub-command per module of this package; each parses its arguments, calls the engine, prints
tables or JSON. Errors a user can act on are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import importlib

import argparse
import os
import sys
from typing import List, Optional

# Must be set before torch / OpenMP load: with the default (ACTIVE) policy, idle OpenMP threads spin
# and torch ran up to 10x slower on a busy 2-core machine (measured, see README "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .. import __version__  # noqa: E402
from ..cliutil import tty_safe  # noqa: E402,F401 - re-exported: the helper for every text-mode print
from ..errors import CbirError  # noqa: E402

from .common import add_common  # noqa: E402

#: the sub-command modules, in the order of `cbir --help`; an optional one whose dependencies are missing is left out
COMMANDS = ("index", "query", "evaluate", "train", "duplicates", "datasets", "match", "export", "paddle", "segment", "serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir", description="Content-based image retrieval: build an index from an image list, query it, re-rank, evaluate.")
    p.add_argument("--version", action="version", version=f"cbir {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for name in COMMANDS:
        try:
            m = importlib.import_module(f"{__name__}.{name}")
        except ImportError as e:
            if e.name and e.name.startswith("cbir"):
                continue
            raise
        m.register(sub, add_common)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from .. import data
    from ..runtime import set_threads, using

    set_threads(a.threads)
    limits = data.set_limits(max_pixels=getattr(a, "max_pixels", None) or data.DEFAULT_MAX_PIXELS)  # --max-pixels
    try:
        # --runtime onnx: every network in onnxruntime (None: $CBIR_RUNTIME / torch); main() called in-process (tests,
        # notebooks) leaves the process default as it was
        with using(getattr(a, "runtime", None)):
            return a.func(a)
    except CbirError as e:
        print(f"error: {tty_safe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: work done so far is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cbir ... | head`: the reader left; no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    finally:
        data.set_limits(**limits)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
