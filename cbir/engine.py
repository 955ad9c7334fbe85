"""The pipeline as a Python API: build an index, load it, query it, evaluate it, train a semantic head.

    file list -> decode -> global extractor -> index -> ranked candidates -> (re-rank) -> evaluator

The command line (cli.py) is a thin layer over these functions.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import __version__
from .data import Entry, iter_decoded, load_dataset, read_file_list
from .errors import CbirError, DecodeError, IndexMismatch, query_failed
from .extractors import DEFAULT_EXTRACTOR
from .extractors.base import Extractor, make_extractor
from .index import store
from .index.backend import FaissBackend, SearchSpec, auto_spec
from .index.faiss_index import CosineIndex, HammingIndex

PathLike = Union[str, os.PathLike]
STATE_FILE = "extractor.h5"
#: local features stored for re-ranking: the 1024 strongest keypoints at up to 1024 px (re-ranking matches
#: the 512 strongest by default; see cbir.local.rerank)
LOCAL_DEFAULTS: Dict[str, Any] = {"max_keypoints": 1024, "max_side": 1024}
#: bytes of rows the final write holds at once (features.h5 and the faiss index are written chunk by chunk)
FINAL_CHUNK_BYTES = 64 << 20


# ------------------------------------------------------------------------------- helpers


def _progress(iterable=None, total=None, desc="", enabled=True, unit="img"):
    from .progress import progress

    return progress(iterable, total=total, desc=desc, enabled=enabled, unit=unit, stream=sys.stderr)


def _log(msg: str, progress=None) -> None:
    if progress is not None and hasattr(progress, "write"):
        progress.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr)


def save_state(path: PathLike, arrays: Dict[str, np.ndarray], attrs: Optional[dict] = None) -> None:
    store.write_arrays(path, arrays, attrs)


def load_state_file(path: PathLike) -> Dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        out: Dict[str, np.ndarray] = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return out


def resolve_extractor(extractor: Union[str, Extractor] = DEFAULT_EXTRACTOR, conf: Optional[Dict[str, Any]] = None) -> Extractor:
    return extractor if isinstance(extractor, Extractor) else make_extractor(extractor, conf or {})


def dedupe(entries: Sequence[Entry]) -> Tuple[List[Entry], List[str]]:
    seen, out, dups = set(), [], []
    for e in entries:
        if e.name in seen:
            dups.append(e.name)
            continue
        seen.add(e.name)
        out.append(e)
    return out, dups


def _stat(path: Path) -> Tuple[int, float]:
    try:
        st = os.stat(path)
        return int(st.st_size), float(st.st_mtime)
    except OSError:
        return -1, -1.0


@dataclass
class BuildReport:
    out: Path
    count: int
    failures: List[Dict[str, str]]
    reused: int
    extracted: int
    seconds: Dict[str, float]
    manifest: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------- build


def _fit_sample(entries: Sequence[Entry], n: int, seed: int = 0) -> List[Entry]:
    if len(entries) <= n:
        return list(entries)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(entries), n, replace=False))
    return [entries[i] for i in idx]


def _batches(it, ext: Extractor, batch_size: int):
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


def build_index(
    entries: Sequence[Entry],
    out: PathLike,
    extractor: Union[str, Extractor] = DEFAULT_EXTRACTOR,
    conf: Optional[Dict[str, Any]] = None,
    roots: Sequence[PathLike] = (),
    **options: Any,
) -> BuildReport:
    """Extract descriptors of ``entries`` and write an index folder ``out``.

    ``out`` must be new, an empty folder or a cbir index (replaced as a whole when the new one is complete);
    anything else (a folder with other files, the gallery, the working folder, a file) is refused before any
    work, and a second build into the same ``out`` stops at once (lock). ``roots``: gallery root folders
    that must not be replaced. Disk-full and read-only targets stop with a one-line error, keeping the work
    done so far for a resumed build. ``options``: see :func:`_build_locked`.
    """
    entries = list(entries)
    out = store.check_out(out, images=[e.path for e in entries], roots=roots)
    work = store.partial_dir(out)
    store.claim_work(work, out)
    with store.BuildLock(work, out):
        try:
            return _build_locked(entries, out, extractor=extractor, conf=conf, **options)
        except store.WriteError as e:
            shutil.rmtree(work / "commit", ignore_errors=True)  # a half-written final folder: made again from the rows
            kept = store.folder_bytes(work)
            done = work.exists() and (any((work / "rows").glob("part-*.h5")) or (work / STATE_FILE).is_file())
            note = (f"; the work done so far ({kept / 1e6:.1f} MB) is kept in {work}: run the same command again to resume"
                    if done else "")
            raise store.WriteError(f"{e}{note}") from None


def _build_locked(
    entries: Sequence[Entry],
    out: PathLike,
    extractor: Union[str, Extractor] = DEFAULT_EXTRACTOR,
    conf: Optional[Dict[str, Any]] = None,
    strict: bool = False,
    batch_size: int = 16,
    workers: int = 2,
    ann: str = "auto",
    search: Optional[Dict[str, Any]] = None,
    progress: bool = True,
    dataset: Optional[Dict[str, Any]] = None,
    label_names: Optional[Dict[str, str]] = None,
    local: Optional[str] = None,
    local_conf: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = None,
) -> BuildReport:
    """The build itself, with ``out`` checked and its work folder locked by :func:`build_index`.

    Resumable: rows already extracted into ``out.partial`` (an interrupted run) or present in an
    existing index at ``out`` with the same extractor and the same file size and mtime are reused.
    Bad images are reported and skipped, or with ``strict`` the build stops at the first one and
    writes no index. The folder appears complete or not at all.
    """
    t_start = time.time()
    out = Path(out)
    ext = resolve_extractor(extractor, conf)
    entries, dups = dedupe(entries)
    say = log or (lambda m: _log(m))
    if dups:
        say(f"warning: {len(dups)} duplicate name(s) in the list skipped, e.g. {dups[0]}")
    if not entries:
        raise CbirError("nothing to index: the list is empty")
    work = store.partial_dir(out)
    seconds: Dict[str, float] = {}

    # -- the work folder: resume only when it was made by the same extractor (config + weights)
    key_nostate = ext.key(with_state=False)
    wmeta_path = work / "work.json"
    try:
        wmeta = json.loads(wmeta_path.read_text())
    except (OSError, ValueError):
        wmeta = None
    if not isinstance(wmeta, dict) or wmeta.get("key") != key_nostate:
        if wmeta is not None:
            say(f"note: {work} holds work of another extractor; starting afresh")
        store.clear_work(work)
    store.write_json_atomic({"key": key_nostate, "identity": ext.identity(with_state=False)}, wmeta_path)

    old_manifest = None
    if (out / store.MANIFEST).is_file():
        try:
            old_manifest = store.read_manifest(out)
        except CbirError:
            old_manifest = None
    old_same = old_manifest is not None and old_manifest.get("extractor", {}).get("key_nostate") == key_nostate

    # -- learned state (codebook...): from the work folder, else from the old index, else fit a sample
    t0 = time.time()
    if ext.needs_fit:
        def reuse(path: Path, folder: Path, manifest: Optional[dict], pre_post: bool) -> bool:
            try:
                arrays = (store.open_checked(folder, STATE_FILE, manifest, load_state_file) if manifest
                          else load_state_file(path))
                ext.load_state(_pre_post_state(arrays, ext) if pre_post else arrays)
                return True
            except (CbirError, OSError, KeyError, ValueError) as e:
                say(f"note: {path}: learned state not reused ({e}); learning it again")
                return False

        if (work / STATE_FILE).is_file() and reuse(work / STATE_FILE, work, None, False):
            pass
        elif old_same and (out / STATE_FILE).is_file() and reuse(out / STATE_FILE, out, old_manifest, True):
            save_state(work / STATE_FILE, ext.state())
        else:
            sample = _fit_sample(entries, max(1, ext.fit_images))
            bad_sample: List[DecodeError] = []

            def sample_images():  # decoded lazily: the sample is never held in memory
                for _, e, img in iter_decoded(sample, ext.max_side, workers=workers):
                    if isinstance(img, DecodeError):
                        bad_sample.append(img)
                    else:
                        yield img

            try:
                ext.fit(sample_images(), wrap=lambda it, desc: _progress(it, total=len(sample), desc=f"fit: {desc}", enabled=progress),
                        n=len(sample))
            except CbirError as e:
                if len(bad_sample) == len(sample):
                    raise CbirError(f"none of the {len(sample)} image(s) sampled to learn {ext.name}'s codebook could be read, "
                                    f"e.g. {bad_sample[0]}") from None
                raise
            save_state(work / STATE_FILE, ext.state())
    seconds["fit"] = round(time.time() - t0, 3)
    key = ext.key(with_state=True)

    # -- rows: reuse what is done
    segments = store.RowSegments(work / "rows", key)
    _, prev_at, bad = segments.locate()  # names, sizes and mtimes only: no descriptor is read here
    if bad:
        say(f"note: {len(bad)} unreadable segment(s) in {work / 'rows'} (an interrupted write); their images are extracted again")
    done: Dict[str, Tuple[int, float]] = {}
    done = {n: (sz, mt) for n, (_, _, sz, mt) in prev_at.items()}
    failures: List[Dict[str, str]] = []
    want = {e.name: e for e in entries}
    # rows of the existing index with the same extractor, file size and mtime
    if old_same and old_manifest.get("extractor", {}).get("key") == key and (out / store.FEATURES).is_file():
        try:
            old = store.open_checked(out, store.FEATURES, old_manifest, lambda p: store.read_rows(p)[0])
        except CbirError as e:
            say(f"note: not reusing the rows of the existing index: {e}")
            old = {"names": []}
        src = "raw" if "raw" in old else "descriptors"
        take = []
        for j, n in enumerate(old["names"]):
            e = want.get(n)
            if e is None or n in done:
                continue
            if _stat(e.path) == (int(old["file_size"][j]), float(old["file_mtime"][j])):
                take.append(j)
        if take:
            segments.append(store.Rows([old["names"][j] for j in take], [str(want[old["names"][j]].path) for j in take],
                                     [want[old["names"][j]].label for j in take], [int(old["file_size"][j]) for j in take],
                                     [float(old["file_mtime"][j]) for j in take], old[src][take].astype(np.float32)))
            for j in take:
                done[old["names"][j]] = (int(old["file_size"][j]), float(old["file_mtime"][j]))
    # rows of the work folder are only valid if the file did not change since
    stale = [n for n, st in done.items() if n in want and _stat(want[n].path) != st]
    todo = [e for e in entries if e.name not in done or e.name in stale]
    reused = sum(1 for n in done if n in want and n not in stale)
    if reused:
        say(f"resuming: {reused} image(s) already extracted, {len(todo)} to go")

    # -- local features (re-ranking) are extracted in the same pass
    local_ext = None
    local_writer = None
    if local:
        from .local.store import LocalFeatureStore, make_local_extractor

        local_ext = make_local_extractor(local, {**LOCAL_DEFAULTS, **(local_conf or {})})
        try:
            local_writer = LocalFeatureStore(work / "local.h5", mode="a")
        except CbirError:  # a file torn by a crash: its features are extracted again
            say(f"note: {work / 'local.h5'} unreadable (an interrupted write); extracting local features again")
            (work / "local.h5").unlink()
            local_writer = LocalFeatureStore(work / "local.h5", mode="a")
        # images whose local features exist already (work folder or old index) are skipped
        if old_manifest and (old_manifest.get("local") or {}).get("key") == local_ext.key() and (out / "local.h5").is_file():
            local_writer.copy_from(out / "local.h5", [n for n in want if n not in stale])
    # -- stop before hours of extraction when the disk cannot hold the result (rows, then features + faiss)
    try:
        d_final, d_raw = int(ext.dim), int(getattr(ext, "raw_dim", ext.dim))
    except Exception:  # noqa: BLE001 - a dimension known only after extraction: the writers report a full disk
        d_final = d_raw = 0
    if d_final:
        store.check_space(work, len(todo) * (4 * d_raw + 300) + len(entries) * (8 * d_final + 300) + (1 << 20), f"{len(entries)} images")
    # -- extract: decode once, at the larger of the global and local sizes; each shrinks further itself
    t0 = time.time()
    extracted = 0
    decode_side = _decode_side(ext.max_side, local_ext.max_side if local_ext is not None else ext.max_side)
    pb = _progress(total=len(todo), desc=f"extract: {ext.name}", enabled=progress)
    try:
        it = iter_decoded(todo, decode_side, workers=workers)
        for kind, item in _batches(it, ext, batch_size):
            if kind == "error":
                i, e, err = item
                if strict:
                    raise CbirError(f"--strict: {err} (no index written; work kept in {work} for a resumed build)")
                failures.append({"path": str(e.path), "name": e.name, "cause": err.cause})
                _log(f"skipped {e.path}: {err.cause}", pb)
                pb.update()
                continue
            imgs = [shrink(img, ext.max_side) for _, _, img in item]
            try:
                raw = ext.extract(imgs)
            except CbirError:
                raise
            except Exception as exc:  # a network failure on one batch: retry one by one to name the image
                raw = _extract_singly(ext, item, failures, strict, pb, exc)
                item = [x for x, r in zip(item, raw) if r is not None]
                raw = np.stack([r for r in raw if r is not None]) if item else None
            if raw is None:
                continue
            norms = np.linalg.norm(raw, axis=1)
            bad = ~np.isfinite(norms) | (norms < 1e-12)
            if bad.any():
                for (_, e, _), b in zip(item, bad):
                    if b:
                        cause = "descriptor is zero or not finite (a blank image without features?)"
                        if strict:
                            raise CbirError(f"--strict: {e.path}: {cause} (no index written)")
                        failures.append({"path": str(e.path), "name": e.name, "cause": cause})
                        _log(f"skipped {e.path}: {cause}", pb)
                item = [x for x, b in zip(item, bad) if not b]
                raw = raw[~bad]
                if not item:
                    continue
            stats = [_stat(e.path) for _, e, _ in item]
            segments.append(store.Rows([e.name for _, e, _ in item], [str(e.path) for _, e, _ in item],
                                     [e.label for _, e, _ in item], [s for s, _ in stats], [m for _, m in stats],
                                     np.asarray(raw, np.float32)))
            if local_ext is not None:
                for _, e, img in item:
                    _put_local(local_writer, local_ext, e, img, pb)
                local_writer.flush()
            extracted += len(item)
            pb.update(len(item))
    except BaseException:
        if local_writer is not None:
            local_writer.close()
        raise
    finally:
        pb.close()
    if local_writer is not None:
        # reused rows whose local features are missing (an index built without --local before)
        missing = [want[n] for n in want if n in done and n not in stale and n not in local_writer]
        if missing:
            pb = _progress(total=len(missing), desc=f"local: {local}", enabled=progress)
            for _, e, img in iter_decoded(missing, local_ext.max_side, workers=workers):
                if not isinstance(img, DecodeError):
                    _put_local(local_writer, local_ext, e, img, pb)
                pb.update()
            pb.close()
        local_writer.close()
    seconds["extract"] = round(time.time() - t0, 3)

    # -- finalise into a fresh folder, then move it into place
    t0 = time.time()
    # streamed from the row segments: memory holds one chunk of rows and the training sample, never all N
    seg_files, loc, _ = segments.locate()
    names = [e.name for e in entries if e.name in loc]
    if not names:
        raise CbirError(f"no image could be read ({len(failures)} failure(s)); no index written")
    n = len(names)

    def raw_of(sel: Sequence[int]) -> np.ndarray:
        return store.RowSegments.gather(seg_files, [loc[names[i]][:2] for i in sel])

    sample = _sample_rows(n)
    if ext.needs_post_fit:  # the post transform (hash centre, whitening) is learned on the sample (all rows up to 200k)
        ext.fit_post(raw_of(sample))
    commit = store.fresh_folder(work / "commit")
    first = ext.post(raw_of([0]))
    d_final = int(first.shape[1])
    metric = "hamming" if ext.binary else "cosine"
    code_bytes = int(ext.encode(first).shape[1]) if ext.binary else 0
    spec = auto_spec(metric, code_bytes * 8 if ext.binary else d_final, n, ann=ann, **(search or {}))
    # features.h5 (+ raw rows a rebuild re-fits the post transform on) and the search structure, before writing a byte
    row_bytes = 4 * d_final + code_bytes + (4 * int(getattr(ext, "raw_dim", d_final)) if ext.needs_post_fit else 0) + 300
    store.check_space(commit, n * (row_bytes + int(spec.bytes_per_image)) + (1 << 20), "the index")
    backend = FaissBackend(spec)
    if not backend.is_trained:
        fit = _fit_rows(n, spec)
        f_raw = raw_of(fit)
        f_final = ext.post(f_raw)
        backend.train(ext.encode(f_final) if ext.binary else f_final)
        del f_raw, f_final
    labels = [want[nm].label for nm in names]
    chunk = max(1, min(65536, FINAL_CHUNK_BYTES // max(1, row_bytes)))
    with store.h5_writing(commit / store.FEATURES) as f:
        w = store.FeatureWriter(f, d_final, "f4", key="descriptors")
        for a in range(0, n, chunk):
            sel = list(range(a, min(n, a + chunk)))
            raw = raw_of(sel)
            final = ext.post(raw).astype(np.float32)
            codes = ext.encode(final) if ext.binary else None
            part = names[a : a + len(sel)]
            w.append(store.Rows(part, [str(want[nm].path.resolve()) for nm in part], labels[a : a + len(sel)],
                                [loc[nm][2] for nm in part], [loc[nm][3] for nm in part], final))
            ids = np.arange(a, a + len(sel), dtype=np.int64)
            w.append_array("ids", ids)
            if codes is not None:
                w.append_array("codes", codes)
            if ext.needs_post_fit:
                w.append_array("raw", raw)
            backend.add(ids, codes if codes is not None else final)
    backend.save(commit / store.FAISS_FILES[metric])
    st = ext.state()
    if st:
        save_state(commit / STATE_FILE, st)
    for k, src in ext.bundle().items():
        shutil.copyfile(src, commit / f"{k}.h5")
    if local_ext is not None:
        os.replace(work / "local.h5", commit / "local.h5")
    seconds["index"] = round(time.time() - t0, 3)
    seconds["total"] = round(time.time() - t_start, 3)
    uniq = sorted({l for l in labels if l is not None})
    manifest = {
        "format_version": store.FORMAT_VERSION,
        "cbir_version": __version__,
        "created": store.now_iso(),
        "extractor": {**ext.identity(with_state=True), "key": key, "key_nostate": key_nostate},
        "kind": "binary" if ext.binary else "float",
        "dim": d_final,
        "code_bits": int(ext.code_bits) if ext.binary else None,
        "metric": metric,
        "faiss": store.FAISS_FILES[metric],
        "ann": spec.ann,
        "search": spec.to_json(),
        "next_id": len(names),
        "count": len(names),
        "dataset": dataset or {},
        "labels": uniq,
        "label_names": label_names or {},
        "failures": failures,
        "seconds": seconds,
        "local": ({"name": local, "key": local_ext.key(), "identity": local_ext.identity()} if local_ext else None),
    }
    manifest["files"] = {p.name: store.file_record(p) for p in sorted(commit.iterdir()) if p.is_file()}
    store.write_json_atomic(manifest, commit / store.MANIFEST)
    store.commit_folder(commit, out)
    shutil.rmtree(work, ignore_errors=True)
    return BuildReport(out=out, count=len(names), failures=failures, reused=reused, extracted=extracted, seconds=seconds, manifest=manifest)


def _sample_rows(n: int, cap: int = 200_000) -> np.ndarray:
    """All rows of a gallery up to ``cap``, else a seeded sample of ``cap`` rows (sorted)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))


def _fit_rows(n: int, spec: SearchSpec, cap: int = 200_000) -> np.ndarray:
    """Rows a search structure is trained on: all of a small gallery, else a seeded sample (PCA, PQ, IVF centroids)."""
    if not (spec.dim or spec.codec == "pq" or spec.ann == "ivf") or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))


def _put_local(writer, local_ext, e: Entry, img: np.ndarray, pb) -> None:
    """Store one image's local features; a failure leaves that image without them (re-ranking scores it 0)."""
    try:
        writer.put(e.name, local_ext.extract(img))
    except Exception as err:  # noqa: BLE001 - reported with the file name, the global row stays
        _log(f"warning: {e.path}: no local features ({err})", pb)


def _decode_side(a: Optional[int], b: Optional[int]) -> Optional[int]:
    return None if a is None or b is None else max(a, b)


def shrink(img: np.ndarray, side: Optional[int]) -> np.ndarray:
    from .data import resize_max_side

    return resize_max_side(img, side) if side else img


def _pre_post_state(arrays: Dict[str, np.ndarray], ext: Extractor) -> Dict[str, np.ndarray]:
    """State saved by an index includes post-fit arrays; before re-fitting post, keep only the fit part."""
    keep = getattr(ext, "fit_state_keys", None)
    if keep is None:
        return arrays
    return {k: v for k, v in arrays.items() if any(k == p or k.startswith(p + "/") for p in keep)}


def _extract_singly(ext, item, failures, strict, pb, exc):
    out = []
    for _, e, img in item:
        try:
            out.append(ext.extract([shrink(img, ext.max_side)])[0])
        except Exception as err:  # noqa: BLE001 - reported with the file name
            if strict:
                raise CbirError(f"--strict: {e.path}: extraction failed ({err})") from err
            failures.append({"path": str(e.path), "name": e.name, "cause": f"extraction failed ({err})"})
            _log(f"skipped {e.path}: extraction failed ({err})", pb)
            out.append(None)
    return out


# ------------------------------------------------------------------------------- loading + search


class Index:
    """A built index folder: manifest, row metadata, descriptors, the faiss index and the extractor."""

    def __init__(self, folder: PathLike, verify: bool = True, mmap: bool = False) -> None:
        """Open ``folder``; every file is checked against the manifest's size and SHA-256 first (``verify``),
        so a damaged index is a one-line error naming the file, never silently wrong rankings."""
        self.folder = Path(folder)
        self.manifest = m = store.read_manifest(self.folder)
        self.metric = m["metric"]
        rows = store.open_checked(self.folder, store.FEATURES, m, lambda p: store.read_rows(p)[0], verify)
        n = m["count"]
        width = m["code_bits"] // 8 if self.metric == "hamming" else m["dim"]
        for key, shape in (("names", (n,)), ("paths", (n,)), ("labels", (n,)), ("descriptors", (n, m["dim"])),
                           *((("codes", (n, width)),) if self.metric == "hamming" else ())):
            got = getattr(rows.get(key), "shape", None)
            if got != shape:
                raise store.damaged(self.folder, store.FEATURES, f"dataset {key!r} has shape {got}, the manifest implies {shape}", m)
        self.names: np.ndarray = rows["names"]
        self.paths: np.ndarray = rows["paths"]
        self.labels: np.ndarray = np.array([l if l != "" else None for l in rows["labels"]], dtype=object)
        self.descriptors: np.ndarray = rows["descriptors"]
        self.codes: Optional[np.ndarray] = rows.get("codes")
        self.ids: np.ndarray = np.asarray(rows["ids"], np.int64) if "ids" in rows else np.arange(n, dtype=np.int64)
        if len(self.ids) != n or (n > 1 and not (np.diff(self.ids) > 0).all()):
            raise store.damaged(self.folder, store.FEATURES, "image ids are not one increasing id per row", m)
        if "search" in m:
            try:
                spec = SearchSpec.from_json(m["search"])
            except (CbirError, TypeError, ValueError) as e:
                raise store.damaged(self.folder, store.MANIFEST, f"invalid search spec: {e}", m) from None
            self.index = store.open_checked(self.folder, m["faiss"], m, lambda p: FaissBackend.open(p, spec, mmap=mmap), verify)
        elif self.metric == "hamming":  # an index written before ids and codecs (flat, row = id)
            self.index = store.open_checked(self.folder, m["faiss"], m, HammingIndex.load, verify)
        else:
            self.index = store.open_checked(self.folder, m["faiss"], m, lambda p: CosineIndex.load(p, ann=m["ann"]), verify)
        if self.index.ntotal != n or self.index.dim != (m["code_bits"] if self.metric == "hamming" else m["dim"]):
            raise store.damaged(self.folder, m["faiss"], f"holds {self.index.ntotal} vectors of dimension {self.index.dim}, "
                                f"the manifest {n} of {m['code_bits'] if self.metric == 'hamming' else m['dim']}", m)
        self._verify = verify
        self._pos = {n: i for i, n in enumerate(self.names)}
        self._extractor: Optional[Extractor] = None

    def open_local(self):
        """``local.h5`` (re-ranking features), checked against the manifest like every index file."""
        from .local.store import LocalFeatureStore

        if not (self.folder / store.LOCAL_FILE).exists() and not self.manifest.get("local"):
            raise CbirError(f"{self.folder}: no local features (build the index with --local FEATURES to re-rank)")
        return store.open_checked(self.folder, store.LOCAL_FILE, self.manifest, lambda p: LocalFeatureStore(p, mode="r"), self._verify)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def extractor_name(self) -> str:
        return self.manifest["extractor"]["name"]

    @property
    def extractor(self) -> Extractor:
        """The extractor exactly as the gallery was described (config + learned state)."""
        if self._extractor is None:
            m = self.manifest
            ident = m["extractor"]
            conf = {}
            for k, v in ident["conf"].items():
                if v == f"@{k}":  # a file the index keeps a copy of (validated as a plain name by the manifest schema)
                    store.verify_file(self.folder, f"{k}.h5", m, self._verify)
                    v = str(self.folder / f"{k}.h5")
                conf[k] = v
            try:
                ext = make_extractor(ident["name"], conf)
            except CbirError as e:
                raise CbirError(f"{self.folder / store.MANIFEST}: its extractor cannot be made here ({e})") from None
            if ident.get("state") is not None or (self.folder / STATE_FILE).exists():
                arrays = store.open_checked(self.folder, STATE_FILE, m, load_state_file, self._verify)
                try:
                    ext.load_state(arrays)
                except (CbirError, KeyError, ValueError) as e:
                    raise store.damaged(self.folder, STATE_FILE, f"learned state does not load: {e}", m) from None
            try:
                dim = int(ext.dim)
            except CbirError as e:
                raise CbirError(f"{self.folder / store.MANIFEST}: its extractor cannot be made here ({e})") from None
            if dim != m["dim"]:  # checked before any descriptor is allocated from a (possibly hostile) conf
                raise store.damaged(self.folder, store.MANIFEST, f"the extractor conf implies {dim}-d descriptors, the index holds {m['dim']}-d", m)
            if ext.weights() != ident.get("weights", {}):
                raise IndexMismatch(
                    f"{self.folder}: the index was built with weights {ident.get('weights')} but this machine resolves {ext.weights()}; "
                    "queries would not be comparable"
                )
            self._extractor = ext
        return self._extractor

    def check_extractor(self, name: Optional[str]) -> None:
        if name and name != self.extractor_name:
            raise IndexMismatch(
                f"{self.folder} was built with extractor {self.extractor_name!r}; a query with {name!r} cannot be compared. "
                f"Drop --extractor or rebuild the index with --extractor {name}"
            )

    def row(self, name: str) -> Optional[int]:
        return self._pos.get(name)

    def query_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored index-side vectors of gallery rows (codes for a Hamming index)."""
        return self.codes[rows] if self.metric == "hamming" else self.descriptors[rows]

    def describe_images(self, images: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(final float descriptors, index-side vectors) of query images."""
        ext = self.extractor
        final = ext.describe(images)
        return final, (ext.encode(final) if self.metric == "hamming" else final)

    def search(self, vectors: np.ndarray, k: int, exclude: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Top-``k`` gallery rows per query (``-1`` where fewer), best first; ``exclude[i]``: a row left out of query i."""
        ex = None
        if exclude is not None:
            exclude = np.asarray(exclude)
            ex = np.where(exclude >= 0, self.ids[np.maximum(exclude, 0)], -1)
        scores, ids = self.index.search(vectors, k, exclude=ex)
        if len(self.ids) == 0:
            return scores, np.full_like(ids, -1)
        rows = np.searchsorted(self.ids, np.maximum(ids, 0))
        rows = np.minimum(rows, len(self.ids) - 1)
        return scores, np.where((ids >= 0) & (self.ids[rows] == ids), rows, -1)

    def set_search(self, nprobe: Optional[int] = None, ef: Optional[int] = None) -> None:
        """Query-time recall/speed of an IVF (``nprobe``) or HNSW (``ef``) index."""
        if hasattr(self.index, "set_search"):
            self.index.set_search(nprobe=nprobe, ef=ef)

    def query_images(self, paths: Sequence[PathLike], top_k: int = 10, exclude_self: bool = False,
                     failures: Optional[List[Dict[str, Any]]] = None,
                     expand: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
        """Rank the gallery for each image file; returns one dict per answered query with its ranked results.

        A query that cannot be answered (unreadable file, an image without a usable descriptor) raises its
        :class:`CbirError`, unless ``failures`` is a list: then ``{"path", "cause", "position"}`` (position: its index
        in ``paths``) is appended there and the other queries are still answered. Errors of the index itself
        (:class:`IndexMismatch`: extractor, weights, dimension) always raise.

        ``expand`` (``{"qe_k", "alpha", "dba_k"}``, cbir/index/expansion.py): alpha-QE and/or DBA.
        """
        from .data import decode_image
        from .index.expansion import for_index

        if int(top_k) < 1:
            raise CbirError(f"top_k must be a positive number of results, got {top_k}")
        ext = self.extractor
        expander = for_index(self, expand)
        search = expander.search if expander is not None else self.search
        out = []
        for pos, p in enumerate(paths):
            t0 = time.time()
            try:
                img = decode_image(p, max_side=ext.max_side)
                _, vec = self.describe_images([img])
                ex = None
                if exclude_self:
                    r = self._row_of_path(p)
                    ex = np.array([-1 if r is None else r])
                scores, ids = search(vec, top_k, exclude=ex)
            except CbirError as err:
                query_failed(failures, p, pos, err)
                continue
            r = self._row_of_path(p)
            out.append({
                "query": str(p),
                "query_label": None if r is None else self.labels[r],
                "seconds": round(time.time() - t0, 4),
                "results": [self.result(int(i), float(s), r + 1) for r, (s, i) in enumerate(zip(scores[0], ids[0])) if i >= 0],
            })
        return out

    def _row_of_path(self, p: PathLike) -> Optional[int]:
        rp = str(Path(p).resolve())
        hits = np.flatnonzero(self.paths == rp)
        return int(hits[0]) if len(hits) else None

    def result(self, i: int, score: float, rank: int) -> Dict[str, Any]:
        label = self.labels[i]
        names = self.manifest.get("label_names") or {}
        return {"rank": rank, "name": str(self.names[i]), "path": str(self.paths[i]), "label": label,
                "label_name": names.get(label, label) if label is not None else None, "score": round(score, 6)}


def load_index(folder: PathLike) -> Index:
    return Index(folder)


def verify_index(folder: PathLike) -> Dict[str, Any]:
    """Check every file of an index against its manifest (size and SHA-256), then open it as a query would
    (shapes, faiss dimensions, the extractor with its learned state and weights, local features).

    Returns ``{"index", "ok", "files": [{"file", "bytes", "ok", "error"?}], "errors": [...]}``; a manifest that is
    missing or invalid raises, as there is nothing to check against.
    """
    folder = Path(folder)
    m = store.read_manifest(folder)
    files, errors = [], []
    recorded = m.get("files") or {}
    if not recorded:
        errors.append(f"{folder / store.MANIFEST}: records no checksums (built by an older cbir); rebuild the index to verify it")
    for name, rec in recorded.items():
        try:
            store.verify_file(folder, name, m, full=True)
            files.append({"file": name, "bytes": rec["bytes"], "ok": True})
        except CbirError as e:
            files.append({"file": name, "bytes": rec["bytes"], "ok": False, "error": str(e)})
            errors.append(str(e))
    extra = sorted(p.name for p in folder.iterdir() if p.name not in recorded and p.name != store.MANIFEST)
    if not errors:
        try:
            idx = Index(folder)
            idx.extractor  # noqa: B018 - builds the extractor: state, dimension and weights checked
            if m.get("local"):
                idx.open_local().close()
        except CbirError as e:
            errors.append(str(e))
    return {"index": str(folder), "ok": not errors, "count": m["count"], "files": files, "unrecorded": extra, "errors": errors}


# ------------------------------------------------------------------------------- add, remove, compact


@dataclass
class UpdateReport:
    index: Path
    count: int
    added: int = 0
    removed: int = 0
    skipped: List[str] = field(default_factory=list)  # names already in the index / not found
    failures: List[Dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0


def _rewrite(idx: "Index", work: Path, rows: Dict[str, np.ndarray], backend: FaissBackend, keep_local: Sequence[str],
             new_local: Dict[str, Any], event: Dict[str, Any]) -> Dict[str, Any]:
    """Write ``idx``'s folder anew from ``rows`` and ``backend`` in ``work/commit`` and move it into place (atomic)."""
    folder, m = idx.folder, idx.manifest
    commit = store.fresh_folder(work / "commit")
    extra = {k: rows[k] for k in ("ids", "codes", "raw") if k in rows}
    store.check_space(commit, sum(v.nbytes for v in rows.values() if isinstance(v, np.ndarray) and v.dtype != object) * 2 + (1 << 20),
                      "the updated index")
    store.write_features(commit / store.FEATURES, store.Rows(list(rows["names"]), list(rows["paths"]),
                                                             [None if l == "" else l for l in rows["labels"]], list(rows["file_size"]),
                                                             list(rows["file_mtime"]), np.asarray(rows["descriptors"], np.float32)), extra)
    backend.save(commit / m["faiss"])
    for name in (m.get("files") or {}):
        if name.endswith(".h5") and name not in (store.FEATURES, store.LOCAL_FILE):
            shutil.copy2(folder / name, commit / name)  # learned state and bundled files: unchanged
    if m.get("local"):
        from .local.store import LocalFeatureStore

        with LocalFeatureStore(commit / store.LOCAL_FILE, mode="a") as lw:
            lw.copy_from(folder / store.LOCAL_FILE, keep_local)
            for name, feats in new_local.items():
                lw.put(name, feats)
    labels = sorted({l for l in rows["labels"] if l != ""})
    manifest = {**m, "count": int(len(rows["names"])), "labels": labels, "search": backend.spec.to_json(),
                "next_id": int(max(int(m.get("next_id", 0)), int(rows["ids"].max()) + 1 if len(rows["ids"]) else 0)),
                "updated": store.now_iso(), "history": [*(m.get("history") or []), {**event, "at": store.now_iso()}][-100:]}
    manifest["files"] = {p.name: store.file_record(p) for p in sorted(commit.iterdir()) if p.is_file()}
    store.write_json_atomic(manifest, commit / store.MANIFEST)
    store.commit_folder(commit, folder)
    return manifest


def _locked_update(folder: PathLike, fn):
    folder = Path(folder)
    if not (folder / store.MANIFEST).is_file():
        store.read_manifest(folder)  # the one-line "not a cbir index" error
    work = store.partial_dir(folder)
    store.claim_work(work, folder)
    with store.BuildLock(work, folder):
        try:
            return fn(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def add_images(folder: PathLike, entries: Sequence[Entry], strict: bool = False, batch_size: int = 16, workers: int = 2,
               progress: bool = True, log: Callable[[str], None] = None) -> UpdateReport:
    """Extract only the images of ``entries`` not yet in the index, with the index's own extractor and learned state,
    and append them under new stable ids. Atomic like a build; queries opened afterwards see them."""
    t0 = time.time()
    say = log or (lambda msg: _log(msg))

    def run(work: Path) -> UpdateReport:
        idx = Index(folder)
        ext = idx.extractor
        new, _ = dedupe(entries)
        present = [e.name for e in new if idx.row(e.name) is not None]
        new = [e for e in new if idx.row(e.name) is None]
        rep = UpdateReport(index=idx.folder, count=len(idx), skipped=present)
        if present:
            say(f"note: {len(present)} image(s) already in the index kept as they are, e.g. {present[0]}")
        if not new:
            return rep
        local_ext = None
        lm = idx.manifest.get("local")
        if lm:
            from .local.store import make_local_extractor

            ident = lm.get("identity") or {}
            local_ext = make_local_extractor(lm["name"], {**(ident.get("conf") or {}), "max_side": ident.get("max_side")})
            if local_ext.key() != lm.get("key"):
                raise IndexMismatch(f"{idx.folder}: its local features ({lm['name']}) cannot be reproduced here (another "
                                    "configuration or weights); rebuild the index to add images")
        raws, metas, new_local = [], [], {}
        side = _decode_side(ext.max_side, local_ext.max_side if local_ext is not None else ext.max_side)
        pb = _progress(total=len(new), desc=f"add: {ext.name}", enabled=progress)
        for kind, item in _batches(iter_decoded(new, side, workers=workers), ext, batch_size):
            if kind == "error":
                _, e, err = item
                if strict:
                    raise CbirError(f"--strict: {err} (nothing added)")
                rep.failures.append({"path": str(e.path), "name": e.name, "cause": err.cause})
                _log(f"skipped {e.path}: {err.cause}", pb)
                pb.update()
                continue
            raw = _extract_singly(ext, item, rep.failures, strict, pb, None) if len(item) == 1 else None
            if raw is None:
                try:
                    raw = list(ext.extract([shrink(img, ext.max_side) for _, _, img in item]))
                except CbirError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one by one, to name the image
                    raw = _extract_singly(ext, item, rep.failures, strict, pb, exc)
            for (_, e, img), r in zip(item, raw):
                if r is None or not np.isfinite(np.linalg.norm(r)) or np.linalg.norm(r) < 1e-12:
                    if r is not None:
                        rep.failures.append({"path": str(e.path), "name": e.name, "cause": "descriptor is zero or not finite"})
                    continue
                raws.append(np.asarray(r, np.float32))
                metas.append((e, _stat(e.path)))
                if local_ext is not None:
                    try:
                        new_local[e.name] = local_ext.extract(img)
                    except Exception as err:  # noqa: BLE001 - the global row stays, re-ranking scores it 0
                        _log(f"warning: {e.path}: no local features ({err})", pb)
            pb.update(len(item))
        pb.close()
        if not raws:
            raise CbirError(f"none of the {len(new)} new image(s) could be read; nothing added")
        raw = np.stack(raws)
        final = ext.post(raw)
        vectors = ext.encode(final) if idx.metric == "hamming" else final
        rows, _ = store.read_rows(idx.folder / store.FEATURES)
        if "ids" not in rows:
            rows["ids"] = idx.ids.copy()
        next_id = int(max(int(idx.manifest.get("next_id", 0)), int(rows["ids"].max()) + 1 if len(rows["ids"]) else 0))
        ids = np.arange(next_id, next_id + len(metas), dtype=np.int64)
        add = {"names": [e.name for e, _ in metas], "paths": [str(e.path.resolve()) for e, _ in metas],
               "labels": ["" if e.label is None else str(e.label) for e, _ in metas], "file_size": [s for _, (s, _) in metas],
               "file_mtime": [t for _, (_, t) in metas], "descriptors": final.astype(np.float32), "ids": ids}
        if "codes" in rows:
            add["codes"] = vectors
        if "raw" in rows:
            add["raw"] = raw
        out = {k: np.concatenate([np.asarray(rows[k], dtype=object if rows[k].dtype == object else rows[k].dtype),
                                  np.asarray(v, dtype=object if rows[k].dtype == object else rows[k].dtype)]) for k, v in add.items()}
        backend = _writable_backend(idx)
        backend.add(ids, vectors)
        _rewrite(idx, work, out, backend, [str(n) for n in idx.names], new_local, {"added": len(ids), "failures": len(rep.failures)})
        rep.added, rep.count = len(ids), len(out["names"])
        return rep

    rep = _locked_update(folder, run)
    rep.seconds = round(time.time() - t0, 3)
    return rep


def _writable_backend(idx: "Index") -> FaissBackend:
    """The index's faiss structure as an updatable backend (an index written before ids gets ids = rows)."""
    if isinstance(idx.index, FaissBackend):
        return idx.index
    m = idx.manifest
    spec = auto_spec(m["metric"], m["code_bits"] if m["metric"] == "hamming" else m["dim"], len(idx), ann=m.get("ann", "flat"))
    b = FaissBackend(spec)
    vecs = idx.codes if m["metric"] == "hamming" else idx.descriptors
    b.train(vecs)
    b.add(idx.ids, vecs)
    return b


def remove_images(folder: PathLike, names: Sequence[str], log: Callable[[str], None] = None) -> UpdateReport:
    """Remove gallery images by name (as listed at build). Atomic; their ids are never reused."""
    t0 = time.time()
    say = log or (lambda msg: _log(msg))

    def run(work: Path) -> UpdateReport:
        idx = Index(folder)
        want = list(dict.fromkeys(str(n) for n in names))
        rows_rm = [idx.row(n) for n in want]
        missing = [n for n, r in zip(want, rows_rm) if r is None]
        if missing:
            say(f"note: {len(missing)} name(s) not in the index, e.g. {missing[0]}")
        drop = np.array(sorted(r for r in rows_rm if r is not None), dtype=np.int64)
        rep = UpdateReport(index=idx.folder, count=len(idx), skipped=missing)
        if not len(drop):
            if want:
                raise CbirError(f"{idx.folder}: none of the {len(want)} name(s) is in the index (names are as listed at build, e.g. {idx.names[0]})")
            return rep
        rows, _ = store.read_rows(idx.folder / store.FEATURES)
        if "ids" not in rows:
            rows["ids"] = idx.ids.copy()
        keep = np.setdiff1d(np.arange(len(idx)), drop)
        out = {k: v[keep] for k, v in rows.items() if isinstance(v, np.ndarray) and len(v) == len(idx)}
        backend = _writable_backend(idx)
        backend.remove(idx.ids[drop])
        _rewrite(idx, work, out, backend, [str(n) for n in out["names"]], {}, {"removed": int(len(drop))})
        rep.removed, rep.count = int(len(drop)), int(len(keep))
        return rep

    rep = _locked_update(folder, run)
    rep.seconds = round(time.time() - t0, 3)
    return rep


def compact_index(folder: PathLike) -> UpdateReport:
    """Rebuild the search structure from the stored vectors: drops HNSW tombstones, retrains PCA/PQ/IVF on the gallery."""
    t0 = time.time()

    def run(work: Path) -> UpdateReport:
        idx = Index(folder)
        rows, _ = store.read_rows(idx.folder / store.FEATURES)
        rows.setdefault("ids", idx.ids.copy())
        m = idx.manifest
        old = idx.index.spec if isinstance(idx.index, FaissBackend) else None
        spec = SearchSpec.from_json({**(old.to_json() if old else {"metric": m["metric"], "dim_in": m["code_bits"] if m["metric"] == "hamming" else m["dim"]}),
                                     "removed": []})
        vecs = rows["codes"] if m["metric"] == "hamming" else rows["descriptors"]
        backend = FaissBackend(spec)
        backend.train(vecs[_fit_rows(len(vecs), spec)])
        backend.add(rows["ids"], vecs)
        _rewrite(idx, work, rows, backend, [str(n) for n in rows["names"]], {}, {"compacted": len(old.removed) if old else 0})
        return UpdateReport(index=idx.folder, count=len(rows["names"]), removed=len(old.removed) if old else 0)

    rep = _locked_update(folder, run)
    rep.seconds = round(time.time() - t0, 3)
    return rep


# ------------------------------------------------------------------------------- evaluation


def _query_entries(index: Index, dataset: Optional[str], split: Optional[str], queries: Optional[PathLike],
                   root: Optional[PathLike], datasets_yaml: Optional[PathLike]) -> Tuple[List[Entry], str]:
    if queries is not None:
        return read_file_list(queries, root=root), str(queries)
    if dataset is not None:
        ds = load_dataset(dataset, split=split, datasets_yaml=datasets_yaml)
        return (ds.queries if ds.queries is not None else ds.gallery), dataset
    # no query set named: every gallery image queries the rest
    return [Entry(str(n), Path(p), l) for n, p, l in zip(index.names, index.paths, index.labels)], "index"


def evaluate(
    index: Union[PathLike, Index],
    dataset: Optional[str] = None,
    split: Optional[str] = None,
    queries: Optional[PathLike] = None,
    root: Optional[PathLike] = None,
    ks: Sequence[int] = (1, 5, 10),
    rerank: Optional[str] = None,
    rerank_top: int = 100,
    rerank_conf: Optional[Dict[str, Any]] = None,
    max_rank: Optional[int] = None,
    datasets_yaml: Optional[PathLike] = None,
    progress: bool = True,
    workers: int = 2,
    plot: Optional[PathLike] = None,
    expand: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Rank the gallery for every query and report precision@k, AP@k, mAP (and N-S where groups have 4).

    Queries that are gallery images (same name) use their stored descriptor and are left out of their
    own ranking (leave-one-out); other queries are extracted. Relevant = same label.

    Queries without any relevant gallery image (a label the gallery lacks) cannot be scored: a warning names one,
    the report counts them apart (``n_queries_without_relevant``, the first 10 in ``queries_without_relevant``) and
    ``n_queries`` counts the queries the metrics are means over; unreadable queries are in ``query_failures``.
    An undefined metric is None, never NaN. Raises :class:`CbirError` when no query can be evaluated.
    ``expand`` (``{"qe_k", "alpha", "dba_k"}``): alpha-QE / DBA (cbir/index/expansion.py), leave-one-out kept.
    """
    from .cliutil import tty_safe
    from .eval.metrics import MetricAccumulator, finite_or_none, seed_scores

    t_start = time.time()
    idx = index if isinstance(index, Index) else Index(index)
    q_entries, source = _query_entries(idx, dataset, split, queries, root, datasets_yaml)
    if all(l is None for l in idx.labels):
        raise CbirError(f"{idx.folder}: the gallery has no labels; build it from a labelled list to evaluate")
    if any(e.label is None for e in q_entries):
        raise CbirError("every query needs a label to be evaluated (the list has unlabelled entries)")

    if ks is None or not len(ks) or any(int(k) < 1 for k in ks):
        raise CbirError(f"cut-offs k must be positive integers, got {list(ks or [])}")
    if max_rank is not None and int(max_rank) < 1:
        raise CbirError(f"max_rank must be a positive number of results, got {max_rank}")
    if not q_entries:
        raise CbirError(f"no query to evaluate: {source} lists none")

    # gallery-side label counts
    gl = np.array(["" if l is None else str(l) for l in idx.labels], dtype=object)
    counts: Dict[str, int] = {}
    for l in gl:
        counts[l] = counts.get(l, 0) + 1

    # relevant gallery items of each query (itself left out when it is a gallery image of the same label);
    # queries without any cannot be scored: counted apart, left out of the metrics, named in the report
    rows = np.array([idx.row(e.name) if idx.row(e.name) is not None else -1 for e in q_entries])
    n_rel_all = np.array([counts.get(str(e.label), 0) - (1 if r >= 0 and gl[r] == str(e.label) else 0)
                          for e, r in zip(q_entries, rows)], dtype=np.int64)
    no_rel = np.flatnonzero(n_rel_all <= 0)
    without_relevant = [{"name": q_entries[i].name, "label": str(q_entries[i].label)} for i in no_rel[:10]]
    if len(no_rel):
        e0 = q_entries[no_rel[0]]
        why = "its label is not in the gallery" if counts.get(str(e0.label), 0) == 0 else "no other gallery image has its label"
        if len(no_rel) == len(q_entries):
            named = sorted(l for l in counts if l)
            shown = ", ".join(repr(l) for l in named[:5]) + (", ..." if len(named) > 5 else "")
            raise CbirError(f"no query can be evaluated: none of the {len(q_entries)} queries has a relevant image in the gallery, "
                            f"e.g. {e0.name!r} with label {str(e0.label)!r} ({why}); gallery labels: {shown}")
        _log(f"warning: {len(no_rel)} of {len(q_entries)} queries have no relevant image in the gallery and are left out of "
             f"the metrics, e.g. {tty_safe(e0.name)} (label {str(e0.label)!r}: {why})")

    # query vectors: stored rows for gallery images, extracted otherwise
    t0 = time.time()
    ext_needed = [i for i, r in enumerate(rows) if r < 0 and n_rel_all[i] > 0]
    dim_vec = idx.codes.shape[1] if idx.metric == "hamming" else idx.descriptors.shape[1]
    qvec = np.zeros((len(q_entries), dim_vec), dtype=np.uint8 if idx.metric == "hamming" else np.float32)
    qfinal = np.zeros((len(q_entries), idx.descriptors.shape[1]), np.float32)
    in_gal = rows >= 0
    if in_gal.any():
        qvec[in_gal] = idx.query_vectors(rows[in_gal])
        qfinal[in_gal] = idx.descriptors[rows[in_gal]]
    failures = []
    keep = np.ones(len(q_entries), bool)
    if ext_needed:
        ext = idx.extractor
        sub = [q_entries[i] for i in ext_needed]
        pb = _progress(total=len(sub), desc="extract queries", enabled=progress)
        for j, e, img in iter_decoded(sub, ext.max_side, workers=workers):
            i = ext_needed[j]
            if isinstance(img, DecodeError):
                failures.append({"path": str(e.path), "cause": img.cause})
                keep[i] = False
                _log(f"skipped query {tty_safe(e.path)}: {tty_safe(img.cause)}", pb)
            else:
                f, v = idx.describe_images([img])
                qfinal[i], qvec[i] = f[0], v[0]
            pb.update()
        pb.close()
    t_extract = time.time() - t0
    qidx = np.flatnonzero(keep & (n_rel_all > 0))
    if not len(qidx):
        f0 = failures[0]
        raise CbirError(f"no query can be evaluated: the {len(failures)} queries with relevant gallery images could not be read, "
                        f"e.g. {f0['path']}: {f0['cause']}")
    labels_q = np.array([str(q_entries[i].label) for i in qidx], dtype=object)
    n_rel = n_rel_all[qidx]
    self_in_gallery = bool((rows[qidx] >= 0).all())
    with_ns = len(counts) > 0 and all(c == 4 for c in counts.values())
    n = len(idx)
    K = n if max_rank is None else min(n, max_rank)

    acc = MetricAccumulator(ks, with_ns=with_ns, self_in_gallery=self_in_gallery)
    acc_rr = MetricAccumulator(ks, with_ns=with_ns, self_in_gallery=self_in_gallery) if rerank else None
    seed_rel = []
    t0 = time.time()
    t_rerank = 0.0
    reranker = None
    if rerank:
        from .local.rerank import Reranker

        reranker = Reranker(idx, rerank, conf=rerank_conf or {})
    from .index.expansion import for_index

    expander = for_index(idx, expand)
    search = expander.search if expander is not None else idx.search
    step = max(1, min(1024, (64 << 20) // max(1, 12 * K)))
    pb = _progress(total=len(qidx), desc="search", enabled=progress, unit="query")
    for a in range(0, len(qidx), step):
        sel = qidx[a : a + step]
        ex = rows[sel]
        s, ids = search(qvec[sel], K, exclude=np.where(ex >= 0, ex, -1))
        rel = (gl[np.maximum(ids, 0)] == labels_q[a : a + step, None]) & (ids >= 0)
        acc.update(rel, n_rel[a : a + step])
        seed_rel.append(rel[:, :10])
        if reranker is not None:
            t1 = time.time()
            ids_rr = np.stack([reranker.rerank(q_entries[i], ids[j], s[j], top=rerank_top) for j, i in enumerate(sel)])
            t_rerank += time.time() - t1
            rel_rr = (gl[np.maximum(ids_rr, 0)] == labels_q[a : a + step, None]) & (ids_rr >= 0)
            acc_rr.update(rel_rr, n_rel[a : a + step])
        pb.update(len(sel))
    pb.close()
    t_search = time.time() - t0 - t_rerank
    nq = len(qidx)

    def curve(values) -> List[Optional[float]]:  # JSON has no NaN: an undefined point is null
        return [None if finite_or_none(x) is None else round(float(x), 4) for x in values]

    report: Dict[str, Any] = {
        "dataset": source,
        "split": split,
        "index": str(idx.folder),
        "extractor": idx.extractor_name,
        "extractor_conf": idx.manifest["extractor"]["conf"],
        "metric": idx.metric,
        "gallery_size": n,
        # n_queries: the queries the metrics are means over; the others are counted apart
        "n_queries": nq,
        "n_queries_listed": len(q_entries),
        "n_queries_without_relevant": int(len(no_rel)),
        "queries_without_relevant": without_relevant,  # the first 10: {"name", "label"}
        "n_query_failures": len(failures),
        "leave_one_out": self_in_gallery,
        "max_rank": K,
        "expand": expander.describe() if expander is not None else None,
        "metrics": acc.summary(),
        "seed_definition": seed_scores(np.concatenate(seed_rel)) if seed_rel else {},
        "pr_curve": {"recall": np.linspace(0, 1, 11).round(2).tolist(), "precision": curve(acc.pr())},
        "seconds": {
            "extract_queries": round(t_extract, 3),
            "search": round(t_search, 3),
            "search_ms_per_query": round(1000 * t_search / max(1, nq), 3),
            "total": round(time.time() - t_start, 3),
        },
        "query_failures": failures,
    }
    if acc_rr is not None:
        report["metrics_rerank"] = acc_rr.summary()
        report["rerank"] = {"matcher": rerank, "top": rerank_top, **reranker.describe()}
        report["seconds"]["rerank"] = round(t_rerank, 3)
        report["seconds"]["rerank_s_per_query"] = round(t_rerank / max(1, nq), 4)
        report["pr_curve_rerank"] = curve(acc_rr.pr())
    if plot:
        from .eval.plots import pr_plot

        curves = {f"{idx.extractor_name} (mAP {report['metrics']['map']:.3f})": acc.pr()}
        if acc_rr is not None:
            curves[f"+ rerank {rerank} (mAP {report['metrics_rerank']['map']:.3f})"] = acc_rr.pr()
        pr_plot(curves, plot, title=f"{source}{'/' + split if split else ''}: {nq} queries, gallery {n}")
    return report


# ------------------------------------------------------------------------------- semantic head


def train_head(
    entries: Sequence[Entry],
    out: PathLike,
    base: str = "fused",
    base_conf: Optional[Dict[str, Any]] = None,
    epochs: int = 300,
    hidden: int = 0,
    weight_decay: float = 1e-2,
    flip: bool = True,
    progress: bool = True,
    workers: int = 2,
    batch_size: int = 16,
    label_names: Optional[Dict[str, str]] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Fit a softmax classifier head on frozen ``base`` descriptors of labelled ``entries`` and save it.

    The head file (HDF5) records the base extractor's config, so ``--extractor semantic --head FILE``
    describes images exactly as the head was trained.
    """
    from .extractors.semantic import fit_head, save_head

    entries = [e for e in dedupe(entries)[0]]
    if any(e.label is None for e in entries):
        raise CbirError("training a head needs a label for every image")
    if base == "fused" and base_conf is None:
        from .extractors import HEAD_BASE_PARTS

        base_conf = {"parts": HEAD_BASE_PARTS}
    ext = resolve_extractor(base, base_conf)
    if ext.needs_fit:
        raise CbirError(f"base extractor {ext.name!r} learns a codebook on the gallery; pick a base without one for a head")
    t0 = time.time()
    feats, labels, failures = [], [], []
    pb = _progress(total=len(entries), desc=f"train: extract {ext.name}", enabled=progress)
    for kind, item in _batches(iter_decoded(entries, ext.max_side, workers=workers), ext, batch_size):
        if kind == "error":
            _, e, err = item
            failures.append({"path": str(e.path), "cause": err.cause})
            _log(f"skipped {e.path}: {err.cause}", pb)
            pb.update()
            continue
        imgs = [img for _, _, img in item]
        f = ext.describe(imgs)
        feats.append(f)
        labels += [e.label for _, e, _ in item]
        if flip:
            feats.append(ext.describe([np.ascontiguousarray(im[:, ::-1]) for im in imgs]))
            labels += [e.label for _, e, _ in item]
        pb.update(len(item))
    pb.close()
    t_extract = time.time() - t0
    X = np.concatenate(feats)
    t0 = time.time()
    head = fit_head(X, labels, hidden=hidden, epochs=epochs, weight_decay=weight_decay, seed=seed)
    head["base"] = {"name": ext.name, "conf": ext.conf, "weights": ext.weights()}
    head["label_names"] = label_names or {}
    head["train"] = {"images": len(entries) - len(failures), "failures": failures, "flip": flip,
                     "train_accuracy": head.pop("train_accuracy"), "seconds_extract": round(t_extract, 2),
                     "seconds_fit": round(time.time() - t0, 2), "created": store.now_iso()}
    save_head(head, out)
    return {"out": str(out), "classes": head["classes"], **head["train"]}
