"""Robust image decoding: the process-wide limits (``--max-pixels``), a byte budget over decoding threads, EXIF
orientation, modes converted to RGB ``uint8`` strip by strip, and the shrink to a longest side.

Images travel through cbir as RGB ``uint8`` arrays of shape ``(H, W, 3)``.
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from contextlib import contextmanager
from typing import Dict, List, Optional, Union

import numpy as np

from ..errors import CbirError, DecodeError

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
