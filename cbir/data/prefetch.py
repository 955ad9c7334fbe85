"""Decoding ahead in background threads, and grouping decoded images into batches (by shape, or as they come)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import DecodeError
from .lists import Entry


def iter_decoded(
    entries: Sequence[Entry], max_side: Optional[int] = None, workers: int = 2, prefetch: int = 16
) -> Iterator[Tuple[int, Entry, Union[np.ndarray, DecodeError]]]:
    """Decode ``entries`` in background threads, yielding ``(i, entry, image or DecodeError)`` in order.

    At most ``prefetch`` decoded images wait in memory, so the network never waits on JPEG decoding
    and memory stays bounded: with ``max_side`` they are the reduced images (``max_side ** 2 * 3`` bytes
    each); full-size decode buffers exist only while an image decodes, and all threads together hold at
    most one image at the pixel cap's worth of them (``cbir.data.decode``'s budget). Without ``max_side`` images come
    back at full size, so the look-ahead is cut to ``workers`` images.
    """
    from .decode import decode_image  # looked up at each call: a test that replaces decode.decode_image is obeyed

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
