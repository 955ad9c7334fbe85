"""The extraction phase of a build, which ``index add`` runs too: images in, rows of raw descriptors out.

    n = extract_rows(ext, entries, segments, fail, batch_size=16, workers=2)

Images are decoded in batches of one shape (:func:`cbir.data.shape_batches`: the peak memory stays flat in N),
described by the extractor (one by one after a batch fails, to name the image), and each batch's rows are appended to
:class:`cbir.index.rows.RowSegments` (a crash loses at most that batch); local features go beside. A bad image or a
zero descriptor goes to ``fail(entry, cause, progress_bar, what=None)``, which reports it or raises.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

from ..data import Entry, file_stat, iter_decoded, shape_batches
from ..errors import CbirError
from ..index.rows import Rows
from ..progress import bar as _progress, log as _log

#: ``fail(entry, cause, progress_bar, what=None)``: an image left out (reported), or the end of the run (raises)
Fail = Callable[..., None]


def decode_side(a: Optional[int], b: Optional[int]) -> Optional[int]:
    """The side images are decoded at for two extractors (global and local): the larger, or full size when one wants it."""
    return None if a is None or b is None else max(a, b)


def shrink(img: np.ndarray, side: Optional[int]) -> np.ndarray:
    from ..data import resize_max_side

    return resize_max_side(img, side) if side else img


def extract_singly(ext, item, fail: Fail, pb) -> list:
    """Descriptors of a batch's images one by one (after the batch failed): None for those that fail (``fail`` told)."""
    out = []
    for _, e, img in item:
        try:
            out.append(ext.extract([shrink(img, ext.max_side)])[0])
        except Exception as err:  # noqa: BLE001 - reported with the file name
            fail(e, f"extraction failed ({err})", pb)
            out.append(None)
    return out


def put_local(writer, local_ext, e: Entry, img: np.ndarray, pb) -> None:
    """Store one image's local features; a failure leaves that image without them (re-ranking scores it 0)."""
    try:
        writer.put(e.name, local_ext.extract(img))
    except Exception as err:  # noqa: BLE001 - reported with the file name, the global row stays
        _log(f"warning: {e.path}: no local features ({err})", pb)


def _described_batches(ext, todo: Sequence[Entry], side: Optional[int], batch_size: int, workers: int, fail: Fail, pb):
    """Decoded and described here: ``("rows", entries, images, raw)`` per batch, ``("error", entry, cause, text)`` per bad image."""
    for kind, item in shape_batches(iter_decoded(todo, side, workers=workers), batch_size):
        if kind == "error":
            _, e, err = item
            yield "error", e, err.cause, str(err)
            continue
        try:
            raw = ext.extract([shrink(img, ext.max_side) for _, _, img in item])
        except CbirError:
            raise
        except Exception:  # noqa: BLE001 - a network failure on one batch: retry one by one to name the image
            raw = extract_singly(ext, item, fail, pb)
            item = [x for x, r in zip(item, raw) if r is not None]
            raw = np.stack([r for r in raw if r is not None]) if item else None
        if raw is not None:
            yield "rows", [e for _, e, _ in item], [img for _, _, img in item], raw


def extract_rows(ext, todo: Sequence[Entry], segments, fail: Fail, *, batch_size: int = 16, workers: int = 2,
                 progress: bool = True, local_ext=None, local_writer=None, ray: Optional[str] = None,
                 desc: Optional[str] = None, strict: bool = False) -> int:
    """Describe ``todo`` into ``segments`` (here, or on a Ray cluster: ``ray``), local features into ``local_writer``;
    returns how many rows were written. ``strict`` is passed to the Ray workers (here ``fail`` decides)."""
    side = decode_side(ext.max_side, local_ext.max_side if local_ext is not None else ext.max_side)
    pb = _progress(total=len(todo), desc=desc or (f"extract: {ext.name}" + (" (ray)" if ray else "")), enabled=progress)
    extracted = 0
    try:
        if ray:
            from ..distributed import ray_rows

            source = ((kind, *rest, None) if kind == "error" else (kind, rest[0], None, rest[1])
                      for kind, *rest in ray_rows(todo, ext, address=ray, batch_size=batch_size, decode_side=side, strict=strict))
        else:
            source = _described_batches(ext, todo, side, batch_size, workers, fail, pb)
        for kind, items, imgs, raw in source:
            if kind == "error":  # items: the entry, imgs: the cause, raw: the message
                fail(items, imgs, pb, what=raw)
                pb.update()
                continue
            norms = np.linalg.norm(raw, axis=1)
            bad = ~np.isfinite(norms) | (norms < 1e-12)
            for e in (e for e, x in zip(items, bad) if x):
                fail(e, "descriptor is zero or not finite (a blank image without features?)", pb)
            if bad.any():
                items = [e for e, x in zip(items, bad) if not x]
                imgs = [im for im, x in zip(imgs, bad) if not x] if imgs is not None else None
                raw = raw[~bad]
                if not items:
                    continue
            stats = [file_stat(e.path) for e in items]
            segments.append(Rows([e.name for e in items], [str(e.path) for e in items], [e.label for e in items],
                                 [s for s, _ in stats], [m for _, m in stats], np.asarray(raw, np.float32)))
            if local_ext is not None and imgs is not None:
                for e, img in zip(items, imgs):
                    put_local(local_writer, local_ext, e, img, pb)
                local_writer.flush()
            extracted += len(items)
            pb.update(len(items))
    finally:
        pb.close()
    return extracted
