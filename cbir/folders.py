"""A folder of images wherever a file list is taken: a sorted recursive walk, what is skipped counted.

The one list of image extensions lives here (:data:`IMAGE_EXTENSIONS`). A folder is walked depth first in natural
order of the names (``img2`` before ``img10``); hidden files and folders (a name starting with ``.``) and files
whose extension is not an image's are skipped and counted; a symbolic link is followed only when it points inside
the folder (and never twice into the same folder); names are the paths relative to the folder, with ``/``.
``labels="folder"`` labels each image with the top-level sub-folder that holds it (images directly in the folder
have none): the layout of Caltech, Flowers and ImageNet-style sets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .data import Entry, natural_key, read_file_list
from .errors import CbirError

PathLike = Union[str, os.PathLike]

#: File name extensions taken as images (lower case): what PIL decodes without plugins.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".tga", ".ico"})
#: ``--labels`` choices: ``folder`` = the top-level sub-folder's name.
LABEL_MODES = ("folder",)


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class FolderScan:
    """What a walk of ``root`` found: the images as entries, and how many entries of each kind it left out."""

    root: Path
    entries: List[Entry]
    skipped: Dict[str, int] = field(default_factory=lambda: {"hidden": 0, "not_image": 0, "outside_links": 0, "unreadable": 0})
    examples: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{n} {k.replace('_', ' ')}" for k, n in self.skipped.items() if n]
        return f"{self.root}: {len(self.entries)} images" + (f" ({', '.join(parts)} skipped)" if parts else "")

    def as_json(self) -> Dict[str, object]:
        return {"folder": str(self.root), "images": len(self.entries), "skipped": dict(self.skipped)}


def label_of(name: str, labels: Optional[str]) -> Optional[str]:
    """The label ``labels`` gives to the image named ``name`` (a ``/`` path relative to the folder)."""
    if labels is None:
        return None
    if labels != "folder":
        raise CbirError(f"--labels {labels!r}: expected one of {', '.join(LABEL_MODES)}")
    parts = name.split("/")
    return parts[0] if len(parts) > 1 else None


def scan_folder(root: PathLike, labels: Optional[str] = None) -> FolderScan:
    """Walk ``root`` (see the module's description); raises :class:`CbirError` when it is not a readable folder."""
    root = Path(os.path.abspath(os.path.expanduser(str(root))))
    if not root.is_dir():
        raise CbirError(f"{root}: not a folder")
    label_of("x", labels)  # an unknown mode is an error before the walk
    real_root = os.path.realpath(root)
    scan = FolderScan(root=root, entries=[])
    seen_dirs = {real_root}

    def skip(kind: str, rel: str) -> None:
        scan.skipped[kind] += 1
        scan.examples.setdefault(kind, rel)

    def inside(p: str) -> bool:
        real = os.path.realpath(p)
        return real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep)

    def walk(folder: str, rel: str) -> None:
        try:
            with os.scandir(folder) as it:
                items = sorted(it, key=lambda d: natural_key(d.name))
        except OSError:
            if rel:
                skip("unreadable", rel)
                return
            raise CbirError(f"{root}: cannot read the folder") from None
        for d in items:
            name = f"{rel}/{d.name}" if rel else d.name
            if d.name.startswith("."):
                skip("hidden", name)
                continue
            try:
                link = d.is_symlink()
                if link and not inside(d.path):
                    skip("outside_links", name)
                    continue
                is_dir = d.is_dir()  # follows a link (inside the folder)
                is_file = not is_dir and d.is_file()
            except OSError:
                skip("unreadable", name)
                continue
            if is_dir:
                real = os.path.realpath(d.path)
                if real in seen_dirs:  # a link back to a folder already walked: no loop, no repeat
                    skip("outside_links" if link else "unreadable", name)
                    continue
                seen_dirs.add(real)
                walk(d.path, name)
            elif is_file and is_image_name(d.name):
                scan.entries.append(Entry(name=name, path=Path(d.path), label=label_of(name, labels)))
            else:
                skip("not_image", name)

    walk(str(root), "")
    return scan


def read_images(source: PathLike, root: Optional[PathLike] = None, labels: Optional[str] = None,
                label_column: Optional[str] = None, scan_out: Optional[List[FolderScan]] = None) -> List[Entry]:
    """The images of ``source``: a folder (walked by :func:`scan_folder`) or a file list (:func:`cbir.data.read_file_list`).

    With a list, ``labels="folder"`` labels each entry by the first folder of its listed path. A path that exists
    but is neither a folder nor a file, or that does not exist, is a :class:`CbirError` saying so. The scan of a
    folder is appended to ``scan_out`` when given (its skipped counts).
    """
    p = Path(os.path.expanduser(str(source)))
    if p.is_dir():
        if root is not None:
            raise CbirError(f"--root {root}: goes with a file list; {source} is a folder (names are relative to it)")
        scan = scan_folder(p, labels=labels)
        if scan_out is not None:
            scan_out.append(scan)
        if not scan.entries:
            raise CbirError(f"{p}: the folder holds no image ({scan.summary().split(': ', 1)[1]}; image extensions: "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        return scan.entries
    if p.is_file():
        entries = read_file_list(p, root=root, label_column=label_column)
        if labels is not None:
            label_of("x", labels)
            entries = [Entry(e.name, e.path, label_of(e.name.replace(os.sep, "/"), labels)) for e in entries]
        return entries
    if os.path.lexists(p):
        raise CbirError(f"{p}: is neither a file list nor a folder (a broken link, a device or a socket)")
    raise CbirError(f"{p}: not found (expected a file list or a folder of images)")


def expand_images(paths: Sequence[PathLike]) -> Tuple[List[str], List[FolderScan]]:
    """Image arguments with each folder replaced by the images found in it (in walk order); files are kept as given."""
    out: List[str] = []
    scans: List[FolderScan] = []
    for p in paths:
        if os.path.isdir(p):
            s = scan_folder(p)
            scans.append(s)
            if not s.entries:
                raise CbirError(f"{p}: the folder holds no image ({s.summary().split(': ', 1)[1]})")
            out.extend(str(e.path) for e in s.entries)
        else:
            out.append(str(p))
    return out, scans
