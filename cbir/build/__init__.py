"""The build stage: a file list in, an index folder out (resumable, atomic, memory bounded by the batch).

    report = build_index(entries, "indexes/corel1k", extractor="fused")
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .. import __version__
from ..data import Entry, dedupe, file_stat as _stat, iter_decoded
from ..errors import CbirError, DecodeError
from ..extractors.base import Extractor, make_extractor
from ..index import knn
from ..index.atomic import WriteError, h5_writing, write_json_atomic
from ..index.backend import FaissBackend, SearchSpec, auto_spec
from ..index.folder import (BuildLock, check_out, check_space, claim_work, clear_work, commit_folder, folder_bytes, fresh_folder,
                           partial_dir, read_manifest)
from ..index.manifest import FAISS_FILES, FEATURES, LOCAL_FILE, MANIFEST, MILVUS_FILE, STATE_FILE, next_id, write_manifest
from ..index.rows import FeatureWriter, Rows, RowSegments, load_state_file, save_state
from ..index.verify import open_checked, verify_file
from ..progress import bar as _progress, log as _log
from .extract import extract_rows, put_local, shrink  # noqa: F401 (shrink: part of the build's API)

PathLike = Union[str, os.PathLike]
#: local features stored for re-ranking by a plain extractor name (--local sift): the 1024 strongest keypoints at up to
#: 1024 px; named confs (--local default) bring their own (cbir.local.confs)
from ..local.confs import LOCAL_DEFAULTS  # noqa: E402,F401
#: bytes of rows the final write holds at once (features.h5 and the faiss index are written chunk by chunk): a
#: default build of 8,000 photos peaked at 570 MiB with 64 MiB chunks (rows held twice at the end, against 505 while
#: extracting), 521 with 4 MiB; what still grows with N is the search structure itself (5 KB per image when flat)
FINAL_CHUNK_BYTES = 4 << 20


def resolve_extractor(extractor: Union[str, Extractor, None] = None, conf: Optional[Dict[str, Any]] = None) -> Extractor:
    """An extractor object; None: the default pipeline's (``DEFAULT_EXTRACTOR`` with ``DEFAULT_CONF`` under ``conf``)."""
    if isinstance(extractor, Extractor):
        return extractor
    if extractor is None:
        from ..extractors import configure

        extractor, base = configure(None)
        conf = {**base, **(conf or {})}
    return make_extractor(extractor, conf or {})


@dataclass
class BuildReport:
    out: Path
    count: int
    failures: List[Dict[str, str]]
    reused: int
    extracted: int
    seconds: Dict[str, float]
    manifest: Dict[str, Any] = field(default_factory=dict)


def _fit_sample(entries: Sequence[Entry], n: int, seed: int = 0) -> List[Entry]:
    if len(entries) <= n:
        return list(entries)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(entries), n, replace=False))
    return [entries[i] for i in idx]


def build_index(
    entries: Sequence[Entry],
    out: PathLike,
    extractor: Union[str, Extractor, None] = None,
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
    out = check_out(out, images=[e.path for e in entries], roots=roots)
    work = partial_dir(out)
    fresh = not work.exists()
    if options.get("vector_store"):
        from ..index.milvus import parse_store

        parse_store(options["vector_store"], out)  # a malformed --store is refused before a folder is made
    claim_work(work, out)
    with BuildLock(work, out):
        try:
            return _build_locked(entries, out, extractor=extractor, conf=conf, **options)
        except WriteError as e:
            shutil.rmtree(work / "commit", ignore_errors=True)  # a half-written final folder: made again from the rows
            kept = folder_bytes(work)
            done = work.exists() and (any((work / "rows").glob("part-*.h5")) or (work / STATE_FILE).is_file())
            note = (f"; the work done so far ({kept / 1e6:.1f} MB) is kept in {work}: run the same command again to resume"
                    if done else "")
            raise WriteError(f"{e}{note}") from None
        except CbirError as e:
            if not (fresh and not any((work / "rows").glob("part-*.h5")) and not (work / STATE_FILE).is_file()):
                raise
            refused = e  # refused before any work: the work folder this call made goes, once its lock is released
    shutil.rmtree(work, ignore_errors=True)
    raise refused


@dataclass
class _Build:
    """What the phases of one build share: the entries, the folders, the extractor and the running tallies."""

    entries: List[Entry]
    out: Path
    work: Path
    ext: Extractor
    say: Callable[[str], None]
    progress: bool
    strict: bool
    workers: int
    want: Dict[str, Entry] = field(default_factory=dict)
    key_nostate: str = ""
    key: str = ""
    old_manifest: Optional[Dict[str, Any]] = None
    old_same: bool = False
    failures: List[Dict[str, str]] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    graph: Optional[Dict[str, Any]] = None  # the graph stage the index records (cbir/index/expansion.py)
    # what the final write records (see :func:`_build_locked`)
    ann: str = "auto"
    search: Optional[Dict[str, Any]] = None
    local: Optional[str] = None
    local_ext: Any = None
    dataset: Optional[Dict[str, Any]] = None
    label_names: Optional[Dict[str, str]] = None
    keep_raw: bool = False
    milvus_uri: Optional[str] = None
    t_start: float = 0.0

    def fail(self, e: Entry, cause: str, pb=None, what: Optional[str] = None) -> None:
        """An image left out (reported), or with ``strict`` the end of the build (work kept for a resume)."""
        if self.strict:
            raise CbirError(f"--strict: {what or f'{e.path}: {cause}'} (no index written; work kept in {self.work} for a resumed build)")
        self.failures.append({"path": str(e.path), "name": e.name, "cause": cause})
        _log(f"skipped {e.path}: {cause}", pb)


def _build_locked(
    entries: Sequence[Entry],
    out: PathLike,
    extractor: Union[str, Extractor, None] = None,
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
    ray: Optional[str] = None,
    keep_raw: bool = False,
    vector_store: Optional[str] = None,
    graph: Any = "default",
) -> BuildReport:
    """The build itself, with ``out`` checked and its work folder locked by :func:`build_index`, phase by phase:
    :func:`_open_work`, :func:`_fit_state`, :func:`_reuse_rows`, :func:`_open_local`,
    :func:`cbir.build.extract.extract_rows` (which ``index add`` runs too), :func:`_fill_local`, :func:`_write_index`.

    Resumable: rows already extracted into ``out.partial`` (an interrupted run) or present in an
    existing index at ``out`` with the same extractor and the same file size and mtime are reused.
    Bad images are reported and skipped, or with ``strict`` the build stops at the first one and
    writes no index. The folder appears complete or not at all. ``ray``: extract on a Ray cluster
    (``auto`` or an address, :mod:`cbir.distributed`); everything else runs here. ``keep_raw``: features.h5 also
    keeps the descriptors before a learned post transform (whitening, hash centre), so a rebuild that learns it again
    reuses them instead of extracting again; otherwise it stores what search needs. ``vector_store``: ``milvus:URI``
    puts the vectors, ids, names and labels in a Milvus collection (:mod:`cbir.index.milvus`); the folder keeps the
    manifest, features, learned state and a pointer file. ``graph``: the graph stage queries of this index get by default
    (``"default"``: :data:`cbir.index.expansion.DEFAULT_GRAPH` for a cosine index; None: plain top-k; or a spec dict);
    the k-NN lists it needs are stored in knn.h5 (cbir/index/knn.py) and kept up to date by add / remove / compact.
    """
    t_start = time.time()
    b = _open_work(entries, Path(out), resolve_extractor(extractor, conf), log, progress, strict, workers)
    b.graph = _graph_spec(graph, b.ext)
    b.milvus_uri = _check_store(b, vector_store, ann, search)  # refused before any work when the store cannot hold it
    b.ann, b.search, b.local, b.dataset, b.label_names, b.keep_raw, b.t_start = ann, search, local, dataset, label_names, keep_raw, t_start
    if ray and local:
        raise CbirError("--ray extracts global descriptors only: build without --local, then add local features with a "
                        "local build (the rows are reused), or drop --ray")
    _fit_state(b)
    segments, done, stale, todo, reused = _reuse_rows(b)
    local_ext, local_writer = _open_local(b, local, local_conf, stale)
    b.local_ext = local_ext
    _check_space(b, todo)
    t0 = time.time()
    try:
        extracted = extract_rows(b.ext, todo, segments, b.fail, batch_size=batch_size, workers=b.workers, progress=b.progress,
                                 local_ext=local_ext, local_writer=local_writer, ray=ray, strict=b.strict)
        if local_writer is not None:
            _fill_local(b, local_ext, local_writer, [b.want[n] for n in b.want if n in done and n not in stale])
    finally:
        if local_writer is not None:
            local_writer.close()
    b.seconds["extract"] = round(time.time() - t0, 3)
    manifest = _write_index(b, segments)
    shutil.rmtree(b.work, ignore_errors=True)
    return BuildReport(out=b.out, count=manifest["count"], failures=b.failures, reused=reused, extracted=extracted,
                       seconds=b.seconds, manifest=manifest)


#: extractors whose indexes get no graph stage unless --graph asks for one (measured: README "Graph stage")
NO_DEFAULT_GRAPH = frozenset({"semantic"})


def _graph_spec(graph: Any, ext: Extractor) -> Optional[Dict[str, Any]]:
    """The graph stage an index records: checked now, before any work (a Hamming index has none: it compares codes)."""
    from ..index.expansion import DEFAULT_GRAPH, parse_expand

    if isinstance(graph, str):
        if graph != "default":
            raise CbirError(f"graph: expected 'default', None or a spec dict, got {graph!r}")
        # semantic: class probabilities, where the stage cost corel1k's test split 0.003 P@10 (0.9808 -> 0.9778)
        return None if ext.binary or ext.name in NO_DEFAULT_GRAPH else parse_expand(DEFAULT_GRAPH)
    spec = parse_expand(graph or None)
    if spec is not None and ext.binary:
        raise CbirError(f"the graph stage {spec} needs float descriptors; {ext.name} makes binary codes (Hamming): drop it")
    return spec


def _open_work(entries: Sequence[Entry], out: Path, ext: Extractor, log, progress: bool, strict: bool, workers: int) -> _Build:
    """Phase 1: the entries (deduplicated) and the work folder, kept only when the same extractor made it."""
    say = log or (lambda m: _log(m))
    entries, dups = dedupe(entries)
    if dups:
        say(f"warning: {len(dups)} duplicate name(s) in the list skipped, e.g. {dups[0]}")
    if not entries:
        raise CbirError("nothing to index: the list is empty")
    b = _Build(entries=entries, out=out, work=partial_dir(out), ext=ext, say=say, progress=progress, strict=strict,
               workers=workers, want={e.name: e for e in entries}, key_nostate=ext.key(with_state=False))
    wmeta_path = b.work / "work.json"
    try:
        wmeta = json.loads(wmeta_path.read_text())
    except (OSError, ValueError):
        wmeta = None
    if not isinstance(wmeta, dict) or wmeta.get("key") != b.key_nostate:
        if wmeta is not None:
            say(f"note: {b.work} holds work of another extractor; starting afresh")
        clear_work(b.work)
    write_json_atomic({"key": b.key_nostate, "identity": ext.identity(with_state=False)}, wmeta_path)
    if (out / MANIFEST).is_file():
        try:
            b.old_manifest = read_manifest(out)
        except CbirError:
            b.old_manifest = None
    b.old_same = b.old_manifest is not None and b.old_manifest.get("extractor", {}).get("key_nostate") == b.key_nostate
    return b


def _check_store(b: _Build, vector_store: Optional[str], ann: str, search: Optional[Dict[str, Any]]) -> Optional[str]:
    """The Milvus URI of ``--store milvus:URI`` (None for the faiss folder), after checking what the store can hold
    with the extractor's kind and dimension (Milvus Lite: no Hamming codes, no PQ; no PCA anywhere)."""
    from ..index.milvus import parse_store

    kind, uri = parse_store(vector_store, b.out)
    if kind != "milvus":
        return None
    try:
        dim = int(b.ext.code_bits) if b.ext.binary else int(b.ext.dim)
    except Exception:  # noqa: BLE001 - a dimension known only after extraction: checked again before the write
        dim = 0
    if dim:
        _store_spec(uri, "hamming" if b.ext.binary else "cosine", dim, len(b.entries), ann, search)
    return uri


def _store_spec(uri: str, metric: str, dim_in: int, n: int, ann: str, search: Optional[Dict[str, Any]]) -> SearchSpec:
    from ..index.milvus import auto_store_spec

    opts = dict(search or {})
    if opts.pop("whiten_power", None):
        raise CbirError("--whiten needs a PCA, which a Milvus store does not apply (it keeps descriptors as they are); "
                        "use the faiss store (the default) or drop --whiten")
    return auto_store_spec(metric, dim_in, n, uri, ann=ann, **opts)


def _fit_state(b: _Build) -> None:
    """Phase 2: the extractor's learned state (codebook...): from the work folder, else the old index, else fit on a sample."""
    t0 = time.time()
    ext, work, out, say = b.ext, b.work, b.out, b.say
    if ext.needs_fit:
        def reuse(path: Path, folder: Path, manifest: Optional[dict], pre_post: bool) -> bool:
            try:
                arrays = (open_checked(folder, STATE_FILE, manifest, load_state_file) if manifest
                          else load_state_file(path))
                ext.load_state(_pre_post_state(arrays, ext) if pre_post else arrays)
                return True
            except (CbirError, OSError, KeyError, ValueError) as e:
                say(f"note: {path}: learned state not reused ({e}); learning it again")
                return False

        if (work / STATE_FILE).is_file() and reuse(work / STATE_FILE, work, None, False):
            pass
        elif b.old_same and (out / STATE_FILE).is_file() and reuse(out / STATE_FILE, out, b.old_manifest, True):
            save_state(work / STATE_FILE, ext.state())
        else:
            sample = _fit_sample(b.entries, max(1, ext.fit_images))
            bad_sample: List[DecodeError] = []

            def sample_images():  # decoded lazily: the sample is never held in memory
                for _, e, img in iter_decoded(sample, ext.max_side, workers=b.workers):
                    if isinstance(img, DecodeError):
                        bad_sample.append(img)
                    else:
                        yield img

            try:
                ext.fit(sample_images(), wrap=lambda it, desc: _progress(it, total=len(sample), desc=f"fit: {desc}", enabled=b.progress),
                        n=len(sample))
            except CbirError as e:
                if len(bad_sample) == len(sample):
                    raise CbirError(f"none of the {len(sample)} image(s) sampled to learn {ext.name}'s codebook could be read, "
                                    f"e.g. {bad_sample[0]}") from None
                raise
            save_state(work / STATE_FILE, ext.state())
    b.seconds["fit"] = round(time.time() - t0, 3)
    b.key = ext.key(with_state=True)


def _reuse_rows(b: _Build):
    """Phase 3: the rows already done (work folder segments, rows of the old index for unchanged files) and the rest to do.

    Returns ``(segments, done {name: (size, mtime)}, stale names, entries to extract, count reused)``."""
    segments = RowSegments(b.work / "rows", b.key)
    _, prev_at, bad = segments.locate()  # names, sizes and mtimes only: no descriptor is read here
    if bad:
        b.say(f"note: {len(bad)} unreadable segment(s) in {b.work / 'rows'} (an interrupted write); their images are extracted again")
    done: Dict[str, Tuple[int, float]] = {n: (sz, mt) for n, (_, _, sz, mt) in prev_at.items()}
    want, out, om = b.want, b.out, b.old_manifest
    # rows of the existing index with the same extractor, file size and mtime, copied chunk by chunk
    if b.old_same and om.get("extractor", {}).get("key") == b.key and (out / FEATURES).is_file():
        try:
            verify_file(out, FEATURES, om)
            _copy_old_rows(out / FEATURES, segments, want, done, b.ext.needs_post_fit, b.say)
        except (CbirError, OSError, KeyError, ValueError) as e:
            b.say(f"note: not reusing the rows of the existing index: {e}")
    # rows of the work folder are only valid if the file did not change since
    stale = [n for n, st in done.items() if n in want and _stat(want[n].path) != st]
    todo = [e for e in b.entries if e.name not in done or e.name in stale]
    reused = sum(1 for n in done if n in want and n not in stale)
    if reused:
        b.say(f"resuming: {reused} image(s) already extracted, {len(todo)} to go")
    return segments, done, stale, todo, reused


def _copy_old_rows(path: Path, segments, want: Dict[str, Entry], done: Dict[str, Tuple[int, float]], post_fit: bool,
                   say: Callable[[str], None]) -> None:
    """Append to ``segments`` the rows of an old ``features.h5`` whose file is unchanged, reading it chunk by chunk.
    ``post_fit``: the extractor learns a post transform, so only raw rows (``--keep-raw``) can be reused."""
    import h5py

    with h5py.File(path, "r") as f:
        if post_fit and "raw" not in f:
            say(f"note: {path} keeps no raw descriptors (built without --keep-raw): every image is extracted again")
            return
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["names"][()]]
        size, mtime = f["file_size"][()], f["file_mtime"][()]
        src = f["raw"] if "raw" in f else f["descriptors"]
        take = [j for j, n in enumerate(names) if n in want and n not in done
                and _stat(want[n].path) == (int(size[j]), float(mtime[j]))]
        chunk = max(1, FINAL_CHUNK_BYTES // max(1, 4 * int(src.shape[1])))
        for a in range(0, len(take), chunk):
            sel = take[a : a + chunk]
            vecs = src[sel].astype(np.float32)  # h5py point selection: increasing rows, one chunk in memory
            segments.append(Rows([names[j] for j in sel], [str(want[names[j]].path) for j in sel], [want[names[j]].label for j in sel],
                                       [int(size[j]) for j in sel], [float(mtime[j]) for j in sel], vecs))
            for j in sel:
                done[names[j]] = (int(size[j]), float(mtime[j]))


def _open_local(b: _Build, local: Optional[str], local_conf: Optional[Dict[str, Any]], stale: Sequence[str]):
    """Phase 4: the local-feature store of the work folder (re-ranking), with what the old index already has."""
    if not local:
        return None, None
    from ..local.store import LocalFeatureStore, make_local_extractor

    local_ext = make_local_extractor(local, local_conf)  # LOCAL_DEFAULTS or the named conf, then local_conf
    path = b.work / "local.h5"
    try:
        writer = LocalFeatureStore(path, mode="a")
    except CbirError:  # a file torn by a crash: its features are extracted again
        b.say(f"note: {path} unreadable (an interrupted write); extracting local features again")
        path.unlink()
        writer = LocalFeatureStore(path, mode="a")
    om = b.old_manifest
    if om and (om.get("local") or {}).get("key") == local_ext.key() and (b.out / "local.h5").is_file():
        writer.copy_from(b.out / "local.h5", [n for n in b.want if n not in stale])
    return local_ext, writer


def _check_space(b: _Build, todo: Sequence[Entry]) -> None:
    """Stop before hours of extraction when the disk cannot hold the result (rows, then features + search structure)."""
    try:
        d_final, d_raw = int(b.ext.dim), int(getattr(b.ext, "raw_dim", b.ext.dim))
    except Exception:  # noqa: BLE001 - a dimension known only after extraction: the writers report a full disk
        return
    check_space(b.work, len(todo) * (4 * d_raw + 300) + len(b.entries) * (8 * d_final + 300) + (1 << 20), f"{len(b.entries)} images")


def _fill_local(b: _Build, local_ext, local_writer, candidates: Sequence[Entry]) -> None:
    """Phase 6: local features of rows that have none yet (reused rows of an index built without them, a Ray pass)."""
    missing = [e for e in candidates if e.name not in local_writer]
    if not missing:
        return
    pb = _progress(total=len(missing), desc=f"local: {local_ext.name}", enabled=b.progress)
    for _, e, img in iter_decoded(missing, local_ext.max_side, workers=b.workers):
        if not isinstance(img, DecodeError):
            put_local(local_writer, local_ext, e, img, pb)
        pb.update()
    pb.close()


@dataclass
class _Final:
    """The final write's rows: the gallery's names in list order, where each row is, and the search structure's spec."""

    names: List[str]
    loc: Dict[str, Tuple[int, int, int, float]]  # name -> (segment, row, file size, mtime)
    raw_of: Callable[[Sequence[int]], np.ndarray]  # raw rows by position in ``names``
    spec: SearchSpec
    d_final: int
    code_bytes: int
    t0: float


def _write_index(b: _Build, segments) -> Dict[str, Any]:
    """Phase 7: features.h5 and the search structure, streamed from the row segments into a fresh folder moved into
    place; memory holds one chunk of rows and the training sample, never all N. Returns the manifest."""
    t0 = time.time()
    ext, work, milvus_uri = b.ext, b.work, b.milvus_uri
    seg_files, loc, _ = segments.locate()
    names = [e.name for e in b.entries if e.name in loc]
    if not names:
        raise CbirError(f"no image could be read ({len(b.failures)} failure(s)); no index written")
    n = len(names)

    def raw_of(sel: Sequence[int]) -> np.ndarray:
        return RowSegments.gather(seg_files, [loc[names[i]][:2] for i in sel])

    if ext.needs_post_fit:  # the post transform (hash centre, whitening) is learned on the sample (all rows up to 200k)
        ext.fit_post(raw_of(_sample_rows(n)))
    commit = fresh_folder(work / "commit")
    first = ext.post(raw_of([0]))
    d_final = int(first.shape[1])
    metric = "hamming" if ext.binary else "cosine"
    code_bytes = int(ext.encode(first).shape[1]) if ext.binary else 0
    dim_in = code_bytes * 8 if ext.binary else d_final
    spec = (_store_spec(milvus_uri, metric, dim_in, n, b.ann, b.search) if milvus_uri
            else auto_spec(metric, dim_in, n, ann=b.ann, **(b.search or {})))
    # features.h5 (+ raw rows a rebuild re-fits the post transform on) and the search structure, before writing a byte
    b.keep_raw = bool(b.keep_raw and ext.needs_post_fit)
    fin = _Final(names, loc, raw_of, spec, d_final, code_bytes, t0)
    check_space(commit, n * (_row_bytes(b, fin) + (0 if milvus_uri else int(spec.bytes_per_image))) + (1 << 20), "the index")
    if not milvus_uri:
        return _write_rows(b, commit, FaissBackend(spec), fin)
    from ..index.milvus import MilvusBackend, collection_name

    backend = MilvusBackend(spec, milvus_uri, collection_name(b.out))
    try:
        manifest = _write_rows(b, commit, backend, fin)
    except BaseException:
        _drop_quietly(milvus_uri, backend.collection)  # the new collection of a build that did not land
        raise
    old = (b.old_manifest or {}).get("store") or {}
    if old.get("uri") and old.get("collection") != backend.collection:
        _drop_quietly(old["uri"], old["collection"], b.say)  # the replaced index's vectors
    return manifest


def _row_bytes(b: _Build, fin: _Final) -> int:
    raw = 4 * int(getattr(b.ext, "raw_dim", fin.d_final)) if b.keep_raw else 0
    return 4 * fin.d_final + fin.code_bytes + raw + 300


def _drop_quietly(uri: str, collection: str, say: Optional[Callable[[str], None]] = None) -> None:
    from ..index.milvus import drop_collection

    try:
        drop_collection(uri, collection)
    except CbirError as e:
        if say is not None:
            say(f"warning: the old Milvus collection {collection} on {uri} could not be dropped ({e}); drop it by hand")


def _write_rows(b: _Build, commit: Path, backend, fin: _Final) -> Dict[str, Any]:
    """features.h5 and the search structure (faiss file or Milvus collection + pointer), chunk by chunk, then the
    learned state, local features, k-NN graph and manifest in ``commit``, moved into place."""
    ext, want, names, n = b.ext, b.want, fin.names, len(fin.names)
    if not backend.is_trained:
        f_final = ext.post(fin.raw_of(fit_rows(n, fin.spec)))
        backend.train(ext.encode(f_final) if ext.binary else f_final)
        del f_final
    labels = [want[nm].label for nm in names]
    chunk = max(1, min(65536, FINAL_CHUNK_BYTES // max(1, _row_bytes(b, fin))))
    with h5_writing(commit / FEATURES) as f:
        w = FeatureWriter(f, fin.d_final, "f4", key="descriptors")
        for a in range(0, n, chunk):
            sel = list(range(a, min(n, a + chunk)))
            raw = fin.raw_of(sel)
            final = ext.post(raw).astype(np.float32)
            codes = ext.encode(final) if ext.binary else None
            part = names[a : a + len(sel)]
            w.append(Rows(part, [str(want[nm].path.resolve()) for nm in part], labels[a : a + len(sel)],
                          [fin.loc[nm][2] for nm in part], [fin.loc[nm][3] for nm in part], final))
            ids = np.arange(a, a + len(sel), dtype=np.int64)
            w.append_array("ids", ids)
            if codes is not None:
                w.append_array("codes", codes)
            if b.keep_raw:
                w.append_array("raw", raw)
            extra = {"names": part, "labels": labels[a : a + len(sel)]} if b.milvus_uri else {}
            backend.add(ids, codes if codes is not None else final, **extra)
    search_file = MILVUS_FILE if b.milvus_uri else FAISS_FILES[fin.spec.metric]
    backend.save(commit / search_file)
    st = ext.state()
    if st:
        save_state(commit / STATE_FILE, st)
    for k, src in ext.bundle().items():
        shutil.copyfile(src, commit / f"{k}.h5")
    if b.local_ext is not None:
        os.replace(b.work / LOCAL_FILE, commit / LOCAL_FILE)
    k_graph = _write_graph(b, commit, backend, n)
    b.seconds["index"] = round(time.time() - fin.t0, 3)
    b.seconds["total"] = round(time.time() - b.t_start, 3)
    manifest = write_manifest(commit, _manifest_fields(b, fin, backend, search_file, labels, k_graph))
    commit_folder(commit, b.out)
    return manifest


def _write_graph(b: _Build, commit: Path, backend, n: int) -> int:
    """knn.h5: each gallery image's neighbours by the index's own search (cbir/index/knn.py), when the index records a
    graph stage (never for a Milvus store); returns its k (0: none)."""
    k_graph = 0 if b.milvus_uri else knn.graph_k(b.graph)
    if k_graph:
        t1 = time.time()
        pb = _progress(total=n, desc="k-NN graph", enabled=b.progress, unit="image")
        nbr, sims = knn.compute_from_file(commit / FEATURES, np.arange(n, dtype=np.int64), backend.search, k_graph, pb.update)
        pb.close()
        knn.write(commit / knn.GRAPH_FILE, nbr, sims)
        b.seconds["graph"] = round(time.time() - t1, 3)
    return k_graph


def _manifest_fields(b: _Build, fin: _Final, backend, search_file: str, labels, k_graph: int) -> Dict[str, Any]:
    """What a build records in the manifest (:func:`cbir.index.manifest.write_manifest` adds the files and checksums)."""
    ext, n = b.ext, len(fin.names)
    return {
        "cbir_version": __version__,
        "extractor": {**ext.identity(with_state=True), "key": b.key, "key_nostate": b.key_nostate},
        "kind": "binary" if ext.binary else "float",
        "dim": fin.d_final,
        "code_bits": int(ext.code_bits) if ext.binary else None,
        "metric": fin.spec.metric,
        "faiss": search_file,
        "store": ({"kind": "milvus", "uri": b.milvus_uri, "collection": backend.collection} if b.milvus_uri else None),
        "ann": fin.spec.ann,
        "search": fin.spec.to_json(),
        "next_id": next_id(None, np.arange(n)),
        "count": n,
        "dataset": b.dataset or {},
        "labels": sorted({l for l in labels if l is not None}),
        "label_names": b.label_names or {},
        "failures": b.failures,
        "keep_raw": b.keep_raw,
        "seconds": b.seconds,
        "local": ({"name": b.local, "key": b.local_ext.key(), "identity": b.local_ext.identity()} if b.local_ext else None),
        "graph": b.graph,
        "knn": {"file": knn.GRAPH_FILE, "k": k_graph} if k_graph else None,
    }


def _sample_rows(n: int, cap: int = 200_000) -> np.ndarray:
    """All rows of a gallery up to ``cap``, else a seeded sample of ``cap`` rows (sorted)."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))


def fit_rows(n: int, spec: SearchSpec, cap: int = 200_000) -> np.ndarray:
    """Rows a search structure is trained on: all of a small gallery, else a seeded sample (PCA, PQ, IVF centroids)."""
    if not (spec.dim or spec.codec == "pq" or spec.ann == "ivf") or n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, cap, replace=False))


def _pre_post_state(arrays: Dict[str, np.ndarray], ext: Extractor) -> Dict[str, np.ndarray]:
    """State saved by an index includes post-fit arrays; before re-fitting post, keep only the fit part."""
    keep = getattr(ext, "fit_state_keys", None)
    if keep is None:
        return arrays
    return {k: v for k, v in arrays.items() if any(k == p or k.startswith(p + "/") for p in keep)}
