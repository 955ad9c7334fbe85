"""File lists, datasets.yaml, robust image decoding and prefetching.

Images travel through cbir as RGB ``uint8`` arrays of shape ``(H, W, 3)``.
"""

from __future__ import annotations

import csv
import io
import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CbirError, DecodeError

PathLike = Union[str, os.PathLike]

#: Default of ``--max-pixels``: images whose width x height (as the file declares it) exceeds this are
#: refused before decoding (decompression bombs, and a memory bound). 128 M pixels admits every camera
#: photo (108 MP phones are 12000x9000, 100 MP medium format 11648x8736, both over the former 100 M),
#: and its decode buffer (PIL keeps RGB/RGBA at 4 bytes a pixel: 512 MB) fits a laptop: with the
#: decode budget below only one such buffer is in flight at a time, whatever the number of threads.
DEFAULT_MAX_PIXELS = 128_000_000
#: Images above this many pixels are refused before decoding; set with :func:`set_limits` (``--max-pixels``).
MAX_PIXELS = DEFAULT_MAX_PIXELS
#: Files above this many bytes are refused before reading.
MAX_BYTES = 256 * 1024 * 1024
#: PIL stores most modes at 4 bytes a pixel; the decode budget is one image at the pixel cap.
_BYTES_PER_PIXEL_MAX = 4
#: Conversions (alpha compositing, palette, 16-bit) run on horizontal strips of about this many bytes.
_STRIP_BYTES = 16 << 20


def set_limits(max_pixels: Optional[int] = None, max_bytes: Optional[int] = None) -> Dict[str, int]:
    """Set the process-wide decoding limits (``--max-pixels``); returns the previous ones (to restore).

    PIL's own ``Image.MAX_IMAGE_PIXELS`` is set to the same number, so PIL never refuses first with
    a number of its own (its warning is silenced: cbir refuses those images itself, naming its limit).
    """
    global MAX_PIXELS, MAX_BYTES
    before = {"max_pixels": MAX_PIXELS, "max_bytes": MAX_BYTES}
    if max_pixels is not None:
        if int(max_pixels) <= 0:
            raise CbirError(f"--max-pixels must be a positive number of pixels, got {max_pixels}")
        MAX_PIXELS = int(max_pixels)
    if max_bytes is not None:
        if int(max_bytes) <= 0:
            raise CbirError(f"the file size limit must be positive, got {max_bytes}")
        MAX_BYTES = int(max_bytes)
    _sync_pil()
    return before


_PIL_SYNCED: List[int] = []


def _sync_pil():
    """Import PIL with its bomb limit equal to cbir's (PIL warns above it and raises above twice it)."""
    from PIL import Image

    if _PIL_SYNCED != [MAX_PIXELS]:
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        _PIL_SYNCED[:] = [MAX_PIXELS]
    # A standing, narrow filter rather than catch_warnings(), which is not thread-safe: the images PIL warns
    # about are the ones over cbir's limit, refused right after with cbir's message. (Re-added if someone
    # reset the filters; a filter put in front of it by the caller still wins.)
    if not any(f[0] == "ignore" and f[2] is Image.DecompressionBombWarning for f in warnings.filters):
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    return Image


class _ByteBudget:
    """Bytes of full-size decode buffers in flight, over all decoding threads of the process.

    An image waits while others hold buffers and its own would take the total over ``limit``; alone it
    always proceeds. So two huge images decode one after the other, small ones side by side.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.used = 0

    @contextmanager
    def hold(self, nbytes: int, limit: int):
        with self._cond:
            while self.used and self.used + nbytes > limit:
                self._cond.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._cond:
                self.used -= nbytes
                self._cond.notify_all()


_DECODE_BUDGET = _ByteBudget()


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


def decode_image(path: PathLike, max_side: Optional[int] = None, max_pixels: Optional[int] = None,
                 max_bytes: Optional[int] = None) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 array, applying EXIF orientation.

    Grey, grey+alpha, palette, RGBA (composited on white), CMYK, 16-bit and float images are converted.
    With ``max_side`` the longer side is reduced to at most that many pixels, as early as the format
    allows: JPEGs are decoded at a reduced scale (draft mode); other formats are decoded at full size
    (one buffer of width x height x 4 bytes at most, counted against the process-wide decode budget),
    shrunk right away by an integer box reduction and converted strip by strip, so memory beyond the
    decode buffer is a strip and the small image. ``max_pixels`` / ``max_bytes`` default to the limits
    of :func:`set_limits`. Raises :class:`DecodeError` naming the file and the cause for missing, empty,
    oversized, truncated and non-image files, and for running out of memory on this one image.
    """
    Image = _sync_pil()
    from PIL import UnidentifiedImageError

    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
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
    return _decode_opened(path, path, max_side, limit)


def decode_bytes(data: bytes, name: str = "upload", max_side: Optional[int] = None, max_pixels: Optional[int] = None,
                 max_bytes: Optional[int] = None) -> np.ndarray:
    """:func:`decode_image` of an in-memory file (an upload): the same limits, conversions and errors, which name
    ``name`` instead of a path. Nothing is written to disk and no path is opened."""
    data = bytes(data or b"")
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    if not data:
        raise DecodeError(name, "empty file (0 bytes)")
    if len(data) > max_bytes:
        raise DecodeError(name, f"file too large ({len(data)} bytes > {max_bytes})")
    return _decode_opened(io.BytesIO(data), name, max_side, MAX_PIXELS if max_pixels is None else int(max_pixels))


def _decode_opened(source, path: str, max_side: Optional[int], limit: int) -> np.ndarray:
    """The decoding of :func:`decode_image` from ``source`` (a path or a binary file object); errors name ``path``."""
    Image = _sync_pil()
    from PIL import UnidentifiedImageError

    w = h = 0
    nbytes = 0
    try:
        with Image.open(source) as im:
            w, h = im.size
            if w * h > limit:
                raise DecodeError(path, _too_large(f"{w}x{h} = {w * h:,}", limit))
            if min(w, h) < 8:
                raise DecodeError(path, f"image too small ({w}x{h} pixels)")
            long_side = max(w, h)
            if max_side and im.format == "JPEG" and long_side >= 2 * max_side:
                im.draft("RGB", (max(1, -(-w * max_side // long_side)), max(1, -(-h * max_side // long_side))))
            dw, dh = im.size  # what will be decoded (smaller than w x h after a JPEG draft)
            nbytes = dw * dh * _pil_bytes_per_pixel(im.mode)
            budget = limit * _BYTES_PER_PIXEL_MAX
            if nbytes > budget:
                raise DecodeError(path, f"decoding {dw}x{dh} {im.mode} would take {nbytes / 2**20:,.0f} MiB, over the "
                                        f"{budget / 2**20:,.0f} MiB budget of --max-pixels {limit:,}")
            factor = max(1, max(dw, dh) // max_side) if max_side else 1
            with _DECODE_BUDGET.hold(nbytes, max(budget, MAX_PIXELS * _BYTES_PER_PIXEL_MAX)):
                try:
                    im.load()
                    orientation = im.getexif().get(0x0112, 1)
                    arr = _reduced_rgb8(im, factor)
                finally:
                    im.close()  # frees the full-size buffer now, inside the budget (a traceback may keep `im`)
                    if nbytes >= _TRIM_BYTES:
                        _malloc_trim()
        arr = _orient(arr, orientation)
    except DecodeError:
        raise
    except MemoryError:
        raise DecodeError(path, f"out of memory decoding this {w}x{h} image (~{max(nbytes, w * h * 4) / 2**20:,.0f} MiB "
                                f"buffer); free memory, or refuse such images up front with a lower --max-pixels") from None
    except UnidentifiedImageError:
        raise DecodeError(path, "not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = int(m.group(1)) if m else None
        if n is not None and n > limit:
            raise DecodeError(path, _too_large(f"{n:,}", limit)) from None
        raise DecodeError(path, f"refused as a decompression bomb by PIL (Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}: {e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise DecodeError(path, f"truncated image data ({msg})") from None
        raise DecodeError(path, f"corrupt image data ({msg or type(e).__name__})") from None
    if max_side:
        arr = resize_max_side(arr, max_side)
    return arr


_TRIM_BYTES = 64 << 20
_LIBC: List = []


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc). Each decoding thread has its own malloc arena, so
    without this a huge buffer freed by one thread stays resident while the next thread decodes another."""
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    if _LIBC[0] is not None:
        _LIBC[0](0)


def _too_large(what: str, limit: int) -> str:
    return f"image too large ({what} pixels > cbir's limit of {limit:,} pixels; raise it with --max-pixels)"


def _pil_bytes_per_pixel(mode: str) -> int:
    """Bytes a pixel of ``mode`` takes in PIL's own image buffer (multi-band modes use 4)."""
    if mode in ("1", "L", "P"):
        return 1
    if mode.startswith("I;16"):
        return 2
    return 4


_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}


def _orient(arr: np.ndarray, orientation) -> np.ndarray:
    """EXIF orientation (as ``ImageOps.exif_transpose``), applied to the already reduced image."""
    method = _TRANSPOSE.get(orientation)
    if method is None:
        return arr
    from PIL import Image

    return np.asarray(Image.fromarray(arr).transpose(getattr(Image.Transpose, method)))


def _reduced_rgb8(im, factor: int) -> np.ndarray:
    """RGB uint8 of a loaded PIL image, box-reduced by the integer ``factor`` (1: full size).

    RGB and L are reduced straight from the decoded buffer. Other modes go strip by strip (a crop of
    about ``_STRIP_BYTES``, converted, reduced, written into the small output), so no second full-size
    buffer is ever made. Alpha is composited on white in premultiplied form: PIL's RGBa holds
    round(colour * alpha / 255), box averages of it are exact, and ``premultiplied + 255 - alpha`` is the
    composite on white; averaging then compositing equals compositing then averaging (both are linear).
    """
    mode = im.mode
    w, h = im.size
    if mode in ("RGB", "L"):
        small = im.reduce(factor) if factor > 1 else im
        return _rgb8_of(np.asarray(small), "RGB" if mode == "RGB" else "L", 255.0)
    hi = 255.0
    if mode.startswith("I;16") or mode in ("I", "F"):
        work = "F"
        top = im.getextrema()[1]
        hi = 65535.0 if mode.startswith("I;16") or top > 255 else 255.0
        if mode == "F" and top <= 1.0:
            hi = 1.0
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in im.info):
        work = "RGBa"
    elif mode == "1":
        work = "L"
    else:  # P, CMYK, YCbCr, LAB, HSV...: colour conversion per strip, before any averaging
        work = "RGB"
    rows = max(1, _STRIP_BYTES // (w * 4 * factor)) * factor
    out = np.empty((-(-h // factor), -(-w // factor), 3), np.uint8)
    for y0 in range(0, h, rows):
        strip = _convert(im.crop((0, y0, w, min(h, y0 + rows))), work)
        if factor > 1:
            strip = strip.reduce(factor)
        a = np.asarray(strip)
        out[y0 // factor: y0 // factor + a.shape[0]] = _rgb8_of(a, work, hi)
    return out


def _convert(im, work: str):
    if im.mode == work:
        return im
    if work == "RGBa":
        return (im if im.mode == "RGBA" else im.convert("RGBA")).convert("RGBa")
    if work == "F" and im.mode not in ("I", "F") and not im.mode.startswith("I;16"):
        return im.convert("L").convert("F")
    return im.convert(work)


def _rgb8_of(a: np.ndarray, work: str, hi: float) -> np.ndarray:
    """A (reduced) strip in its working mode as RGB uint8."""
    if work == "RGB":
        return a
    if work == "L":
        return np.repeat(a[..., None], 3, axis=2)
    if work == "RGBa":  # premultiplied colour + white behind the transparent part; never above 255
        return np.minimum(a[..., :3].astype(np.uint16) + (255 - a[..., 3:4]).astype(np.uint16), 255).astype(np.uint8)
    g = np.clip(a.astype(np.float32) * np.float32(255.0 / hi), 0, 255).round().astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


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
    and memory stays bounded: with ``max_side`` they are the reduced images (``max_side ** 2 * 3`` bytes
    each); full-size decode buffers exist only while an image decodes, and all threads together hold at
    most one image at the pixel cap's worth of them (``_DECODE_BUDGET``). Without ``max_side`` images come
    back at full size, so the look-ahead is cut to ``workers`` images.
    """
    if not max_side:
        prefetch = min(prefetch, max(1, workers))

    def job(e: Entry):
        try:
            return decode_image(e.path, max_side=max_side)
        except DecodeError as err:
            return err
        except MemoryError:  # out of memory outside decode_image's own guard: still this image's failure only
            return DecodeError(str(e.path), "out of memory while decoding")

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


def shape_batches(it, batch_size: int, max_waiting: Optional[int] = None):
    """Like :func:`batches`, but each batch holds images of one shape: a network then sees the same tensor sizes
    batch after batch and the allocator reuses the same blocks. Mixed sizes in every batch (Corel's 384x256 next to
    256x384, two scales each) made glibc's heap fragment, and the peak RSS of a build grew with the number of images
    (1.10 GB for 500 Corel images, 1.60 GB for 2000). At most ``max_waiting`` images (default 4 batches) wait for
    their batch to fill; past that the fullest group goes as it is, so memory stays bounded by the batch whatever
    the mix of sizes. Batches come out of order (each row keeps its entry); failures pass through one by one."""
    cap = max(batch_size, int(max_waiting or 4 * batch_size))
    groups: Dict[Tuple[int, ...], List[Tuple[int, Entry, np.ndarray]]] = {}
    waiting = 0
    for i, e, img in it:
        if isinstance(img, DecodeError):
            yield "error", (i, e, img)
            continue
        g = groups.setdefault(img.shape, [])
        g.append((i, e, img))
        waiting += 1
        if len(g) >= batch_size:
            waiting -= len(g)
            yield "batch", groups.pop(img.shape)
        elif waiting > cap:
            key = max(groups, key=lambda k: len(groups[k]))
            waiting -= len(groups[key])
            yield "batch", groups.pop(key)
    for g in sorted(groups.values(), key=lambda g: g[0][0]):
        yield "batch", g


def batches(it, batch_size: int):
    """Group decoded images into batches; failures pass through one by one."""
    batch: List[Tuple[int, Entry, np.ndarray]] = []
    for i, e, img in it:
        if isinstance(img, DecodeError):
            yield "error", (i, e, img)
            continue
        batch.append((i, e, img))
        if len(batch) >= batch_size:
            yield "batch", batch
            batch = []
    if batch:
        yield "batch", batch
