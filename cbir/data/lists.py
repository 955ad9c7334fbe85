"""File lists: the seed format (``path<TAB>label``) and CSV, names as an index keeps them, duplicates, file stats."""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from ..errors import CbirError

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Entry:
    """One image of a list: ``name`` as written in the list, ``path`` resolved against the root."""

    name: str
    path: Path
    label: Optional[str] = None


# --------------------------------------------------------------------------- file lists

_LABEL_COLUMNS = ("label", "label_id", "group_id", "group", "class", "category")


def natural_key(text: str) -> Tuple:
    """Sort key that orders ``img2`` before ``img10``."""
    return tuple(int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text))


def read_file_list(list_file: PathLike, root: Optional[PathLike] = None, label_column: Optional[str] = None) -> List[Entry]:
    """Read a list of images.

    Two formats are accepted:

    * the seed format, one ``path<TAB>label`` per line (the label is optional, any whitespace separates it
      when there is no tab, ``#`` starts a comment);
    * CSV with a header whose first column is ``path`` and a label column (``label``, ``label_id``,
      ``group_id``... or the one named by ``label_column``).

    Relative paths are resolved against ``root`` (default: the folder of the list).
    """
    list_file = Path(list_file)
    if not list_file.is_file():
        raise CbirError(f"{list_file}: file list not found")
    base = Path(root) if root is not None else list_file.parent
    text = _list_text(list_file)
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    if list_file.suffix.lower() == ".csv" or first.replace(" ", "").lower().startswith("path,"):
        pairs = _read_csv(text, list_file, label_column)
    else:
        pairs = _read_plain(text)
    entries = []
    outside = [os.path.normpath(n) for n, _ in pairs if os.path.isabs(n) and list_name(n, base).startswith("/")]
    common = os.path.commonpath([os.path.dirname(n) for n in outside]) if outside else None
    for name, label in pairs:
        p = Path(name)
        path = p if p.is_absolute() else base / p
        if name != name.rstrip() and not path.exists() and Path(str(path).rstrip()).exists():
            name, path = name.rstrip(), Path(str(path).rstrip())  # trailing spaces before a tab that the file does not have
        n = list_name(name, base)
        if n.startswith("/") and common and common != "/":  # outside the root: relative to the folder the list's images share
            n = list_name(n, common)
        entries.append(Entry(name=n, path=path, label=label))
    if not entries:
        raise CbirError(f"{list_file}: the list holds no image")
    return entries


#: what image files start with: a list file is text
_IMAGE_MAGIC = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG\r\n", "a PNG image"))


def _list_text(list_file: Path) -> str:
    """The text of a file list; an image, a binary file or a file that is not UTF-8 is a one-line :class:`CbirError`."""
    try:
        data = list_file.read_bytes()
    except OSError as e:
        raise CbirError(f"{list_file}: cannot read the file list ({e.strerror})") from None
    kind = next((what for magic, what in _IMAGE_MAGIC if data.startswith(magic)), None)
    if kind is not None or b"\x00" in data[:65536]:
        raise CbirError(f"{list_file}: is {kind or 'a binary file'}, not a file list (one image path per line, UTF-8 text); "
                        "pass images to add or remove by name, or a list with --list")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CbirError(f"{list_file}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save the list as UTF-8") from None


def list_name(name: str, root: PathLike) -> str:
    """An image's name in an index: its path as listed, normalised (``./a``, ``a//b`` and ``a/./b`` name the same file),
    relative to ``root`` when it is an absolute path inside it, so that one file has one name whatever the spelling and an
    absolute path of this machine is not kept as a name when the list's folder (or ``--root``) holds the image
    (:func:`read_file_list` names the other absolute paths relative to the folder they share)."""
    if name.startswith("/") or os.path.isabs(name):
        n = os.path.normpath(name)
        r = os.path.normpath(os.path.abspath(root))
        if n.startswith(r.rstrip(os.sep) + os.sep):
            n = n[len(r.rstrip(os.sep)) + 1:]
        return n.replace(os.sep, "/")
    n = os.path.normpath(name).replace(os.sep, "/")
    return n


def _read_plain(text: str) -> List[Tuple[str, Optional[str]]]:
    pairs = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        body = raw.lstrip()
        if "\t" in body:
            parts = [p.strip() for p in line.split("\t") if p.strip()]
            head = body.split("\t", 1)[0]
            if head.rstrip() == parts[0]:
                parts[0] = head  # a name may end in spaces when a tab follows it (read_file_list checks the disk)
        else:
            parts = line.rsplit(None, 1)
        pairs.append((parts[0], parts[1] if len(parts) > 1 else None))
    return pairs


def _read_csv(text: str, list_file: Path, label_column: Optional[str]) -> List[Tuple[str, Optional[str]]]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip() for f in (reader.fieldnames or [])]
    if "path" not in fields:
        raise CbirError(f"{list_file}: a CSV list needs a 'path' column, found {fields}")
    if label_column is not None and label_column not in fields:
        raise CbirError(f"{list_file}: no column {label_column!r} (columns: {fields})")
    col = label_column or next((c for c in _LABEL_COLUMNS if c in fields), None)
    if col is None:
        col = next((c for c in fields if c != "path"), None)
    pairs = []
    for row in reader:
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        if not row.get("path"):
            continue
        pairs.append((row["path"], row.get(col) or None if col else None))
    return pairs


def dedupe(entries: Sequence[Entry]) -> Tuple[List[Entry], List[str]]:
    """``entries`` without repeated names (the first kept) and the names that repeated."""
    seen, out, dups = set(), [], []
    for e in entries:
        if e.name in seen:
            dups.append(e.name)
            continue
        seen.add(e.name)
        out.append(e)
    return out, dups


def file_stat(path: PathLike) -> Tuple[int, float]:
    """(size, mtime) of a file, ``(-1, -1.0)`` when it cannot be read: what a resumed build compares."""
    try:
        st = os.stat(path)
        return int(st.st_size), float(st.st_mtime)
    except OSError:
        return -1, -1.0
