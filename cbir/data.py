"""File lists, datasets.yaml, robust image decoding and prefetching.

Images travel through cbir as RGB ``uint8`` arrays of shape ``(H, W, 3)``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CbirError, DecodeError

PathLike = Union[str, os.PathLike]

#: Images above this many pixels are refused before decoding (decompression bombs).
MAX_PIXELS = 100_000_000
#: Files above this many bytes are refused before reading.
MAX_BYTES = 256 * 1024 * 1024


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
    text = list_file.read_text(encoding="utf-8-sig")
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), "")
    if list_file.suffix.lower() == ".csv" or first.replace(" ", "").lower().startswith("path,"):
        pairs = _read_csv(text, list_file, label_column)
    else:
        pairs = _read_plain(text)
    entries = []
    for name, label in pairs:
        p = Path(name)
        entries.append(Entry(name=name, path=p if p.is_absolute() else base / p, label=label))
    if not entries:
        raise CbirError(f"{list_file}: the list holds no image")
    return entries


def _read_plain(text: str) -> List[Tuple[str, Optional[str]]]:
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\t" in line:
            parts = [p.strip() for p in line.split("\t") if p.strip()]
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


def write_file_list(entries: Iterable[Entry], path: PathLike) -> None:
    """Write entries in the seed format (``name<TAB>label``)."""
    with open(path, "w", encoding="utf-8") as f:
        for e in entries:
            f.write(f"{e.name}\t{e.label}\n" if e.label is not None else f"{e.name}\n")


# --------------------------------------------------------------------------- datasets.yaml


@dataclass
class Dataset:
    """A named dataset of datasets.yaml: gallery entries and, when the dataset has them, separate queries."""

    name: str
    gallery: List[Entry]
    queries: Optional[List[Entry]] = None  # None: every gallery image queries the rest (leave-one-out)
    label_names: Optional[Dict[str, str]] = None
    split: Optional[str] = None


def find_datasets_yaml(explicit: Optional[PathLike] = None) -> Path:
    """datasets.yaml: ``explicit``, else ``$CBIR_DATASETS``, else ``./datasets.yaml``, else the checkout's own."""
    candidates = [explicit, os.environ.get("CBIR_DATASETS"), "datasets.yaml", Path(__file__).resolve().parent.parent / "datasets.yaml"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c).resolve()
    if explicit:
        raise CbirError(f"{explicit}: datasets file not found")
    raise CbirError("no datasets.yaml found (looked at $CBIR_DATASETS, ./datasets.yaml and the cbir checkout); pass --datasets FILE")


def load_datasets_yaml(path: Optional[PathLike] = None) -> Tuple[Path, Dict[str, dict]]:
    import yaml

    p = find_datasets_yaml(path)
    with open(p, encoding="utf-8") as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict):
        raise CbirError(f"{p}: expected a mapping of dataset names")
    return p, spec


def dataset_names(path: Optional[PathLike] = None) -> List[str]:
    return list(load_datasets_yaml(path)[1])


def load_dataset(name: str, split: Optional[str] = None, datasets_yaml: Optional[PathLike] = None) -> Dataset:
    """Load dataset ``name`` from datasets.yaml; paths in the yaml are relative to the yaml file."""
    yaml_path, spec = load_datasets_yaml(datasets_yaml)
    if name not in spec:
        raise CbirError(f"unknown dataset {name!r} in {yaml_path}; known: {', '.join(spec)}")
    d = spec[name] or {}
    root = (yaml_path.parent / d.get("root", ".")).resolve()
    if d.get("generate") and not (root / d.get("list", "list.txt")).is_file():
        _generate(d["generate"], root)
    if not root.is_dir():
        raise CbirError(
            f"dataset {name!r}: folder {root} not found. {d.get('missing_hint', 'Fetch the data there or edit ' + str(yaml_path) + '.')}"
        )
    gallery = _entries_of(d.get("list", d.get("gallery")), root, d.get("label_column"), name)
    queries = _entries_of(d["queries"], root, d.get("label_column"), name) if d.get("queries") else None
    if split is not None:
        splits = d.get("splits") or {}
        if split not in splits:
            raise CbirError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits) or 'none'}")
        gallery = apply_split(gallery, splits[split])
    names = d.get("label_names")
    names = {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None
    return Dataset(name=name, gallery=gallery, queries=queries, label_names=names, split=split)


def _entries_of(spec, root: Path, label_column: Optional[str], name: str) -> List[Entry]:
    if spec is None:
        raise CbirError(f"dataset {name!r}: no 'list' given in datasets.yaml")
    if isinstance(spec, list):
        entries = []
        for item in spec:
            if isinstance(item, dict):
                entries.append(Entry(str(item["path"]), root / str(item["path"]), _label(item.get("label"))))
            else:
                entries.append(Entry(str(item), root / str(item), None))
        return entries
    return read_file_list(root / spec, root=root, label_column=label_column)


def _label(v) -> Optional[str]:
    return None if v is None else str(v)


def apply_split(entries: List[Entry], rule: dict) -> List[Entry]:
    """Split rules: ``{per_label: first_half|second_half}`` (by natural file-name order) or ``{list: FILE}``."""
    per_label = rule.get("per_label")
    if per_label not in ("first_half", "second_half"):
        raise CbirError(f"unsupported split rule {rule!r}")
    groups: Dict[Optional[str], List[Entry]] = {}
    for e in entries:
        groups.setdefault(e.label, []).append(e)
    keep = set()
    for members in groups.values():
        members = sorted(members, key=lambda e: natural_key(e.name))
        half = len(members) // 2
        keep.update(e.name for e in (members[:half] if per_label == "first_half" else members[half:]))
    return [e for e in entries if e.name in keep]


def _generate(kind: str, root: Path) -> None:
    if kind != "demo":
        raise CbirError(f"unknown dataset generator {kind!r}")
    from .demo import make_demo_dataset

    make_demo_dataset(root)


# --------------------------------------------------------------------------- decoding


def decode_image(path: PathLike, max_side: Optional[int] = None, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 array, applying EXIF orientation.

    Grey, grey+alpha, palette, RGBA (composited on white), CMYK, 16-bit and float images are converted.
    With ``max_side`` the longer side is reduced to at most that many pixels (JPEGs are decoded at a
    reduced scale first, which is much faster for large photos). Raises :class:`DecodeError` naming the
    file and the cause for missing, empty, oversized, truncated and non-image files.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = str(path)
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise DecodeError(path, "file not found") from None
    except OSError as e:
        raise DecodeError(path, f"cannot stat file ({e.strerror})") from None
    if os.path.isdir(path):
        raise DecodeError(path, "is a folder, not an image")
    if size == 0:
        raise DecodeError(path, "empty file (0 bytes)")
    if size > max_bytes:
        raise DecodeError(path, f"file too large ({size} bytes > {max_bytes})")
    try:
        with open(path, "rb") as f:
            data = f.read()
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise DecodeError(path, f"image too large ({w}x{h} = {w * h} pixels > {max_pixels})")
            if max_side and im.format == "JPEG" and max(w, h) > 2 * max_side:
                im.draft("RGB", (max_side, max_side))
            im.load()
            im = ImageOps.exif_transpose(im)
            arr = _to_rgb8(im)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError(path, f"refused as a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise DecodeError(path, f"truncated image data ({msg})") from None
        raise DecodeError(path, f"corrupt image data ({msg or type(e).__name__})") from None
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise DecodeError(path, f"image too small ({arr.shape[1]}x{arr.shape[0]} pixels)")
    if max_side:
        arr = resize_max_side(arr, max_side)
    return arr


def _to_rgb8(im) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        return np.asarray(im, dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        hi = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
        if mode == "F" and a.max() <= 1.0:
            hi = 1.0
        g = np.clip(a * (255.0 / hi), 0, 255).round().astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        a = np.asarray(rgba, dtype=np.float32)
        alpha = a[..., 3:4] / 255.0
        rgb = a[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return rgb.round().astype(np.uint8)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def resize_max_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longer side is at most ``max_side`` (area interpolation); never enlarges."""
    import cv2

    h, w = img.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return img
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def iter_decoded(
    entries: Sequence[Entry], max_side: Optional[int] = None, workers: int = 2, prefetch: int = 16
) -> Iterator[Tuple[int, Entry, Union[np.ndarray, DecodeError]]]:
    """Decode ``entries`` in background threads, yielding ``(i, entry, image or DecodeError)`` in order.

    At most ``prefetch`` decoded images wait in memory, so the network never waits on JPEG decoding
    and memory stays bounded.
    """

    def job(e: Entry):
        try:
            return decode_image(e.path, max_side=max_side)
        except DecodeError as err:
            return err

    if workers <= 0:
        for i, e in enumerate(entries):
            yield i, e, job(e)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cbir-decode") as pool:
        pending = []
        it = iter(enumerate(entries))
        for i, e in it:
            pending.append((i, e, pool.submit(job, e)))
            if len(pending) >= prefetch:
                break
        while pending:
            i, e, fut = pending.pop(0)
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], nxt[1], pool.submit(job, nxt[1])))
            yield i, e, fut.result()
