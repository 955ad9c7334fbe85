"""The index folder's life: where a build works (``OUT.partial``), its lock, and the swap that puts a finished index in place.

A build or update writes the new folder under ``OUT.partial`` (locked by :class:`BuildLock`), then
:func:`commit_folder` moves the old folder aside and the new one in by two renames; :func:`recover` puts an index back
when a process died between them. Only an empty folder or a cbir index folder is ever replaced (:func:`check_out`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, TypeVar

from ..errors import CbirError, IndexDamaged
from .atomic import WriteError, existing_parent, megabytes, write_error
from .manifest import MANIFEST, OWNED_FILES, PLAIN_NAME, load_manifest
from .verify import verify_file

T = TypeVar("T")


class Locked(CbirError):
    """Another process holds the build lock of this index (the service answers 409)."""


class Kept(CbirError):
    """The new index could not be moved into place and is kept in the work folder, as the message says."""


def partial_dir(folder: os.PathLike) -> Path:
    """Where an unfinished build of ``folder`` keeps its work (beside it, so ``folder`` is never half-written)."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".partial")


def owned_name(name: str) -> bool:
    """Whether an entry of an index folder is one a build writes (``NAME.h5`` copies of bundled files included)."""
    return name in OWNED_FILES or (name.endswith(".h5") and PLAIN_NAME.match(name) is not None) or name.endswith(".tmp")


def is_index_folder(folder: Path) -> bool:
    """A folder holding a cbir manifest and nothing a build did not write."""
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(m, dict) or "format_version" not in m or "extractor" not in m:
        return False
    return all(p.is_file() and owned_name(p.name) for p in folder.iterdir())


def _is_within(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def foreign_entry(folder: Path) -> Optional[str]:
    """The name of an entry of an index folder that a build did not write (a stray file, a sub-folder), or None."""
    try:
        return next((p.name for p in sorted(Path(folder).iterdir()) if not (p.is_file() and not p.is_symlink() and owned_name(p.name))), None)
    except OSError:
        return None


def check_out(out: os.PathLike, images: Sequence[os.PathLike] = (), roots: Sequence[os.PathLike] = ()) -> Path:
    """Refuse an ``--out`` whose replacement could destroy what cbir did not write; returns the absolute path.

    Accepted: a path that does not exist, an empty folder, or a cbir index folder (replaced as a whole when
    the new one is complete). Refused with a one-line error: ``.``, the working folder or a parent of it, a
    file, a folder holding other files, and a folder that is (or holds) the gallery root or a listed image.
    """
    raw = str(out)
    if raw.strip() in ("", ".", "./", ".."):
        raise CbirError(f"--out {raw!r}: name a new folder for the index (e.g. indexes/NAME), not the working folder")
    p = Path(os.path.abspath(os.path.expanduser(raw)))
    cands = {str(p), os.path.realpath(p)}
    cwd = {os.path.abspath(os.getcwd()), os.path.realpath(os.getcwd())}
    if any(_is_within(c, o) for c in cwd for o in cands):
        raise CbirError(f"{p}: is the working folder or a parent of it; refusing to use it as --out (name a new folder)")
    for r in roots:
        rr = {os.path.abspath(r), os.path.realpath(r)}
        if any(_is_within(x, o) for x in rr for o in cands):
            raise CbirError(f"{p}: holds the gallery's root folder {r}; refusing to replace it with an index (name a new folder)")
    for img in images:
        ia = os.path.abspath(img)
        if any(_is_within(ia, o) for o in cands):
            raise CbirError(f"{p}: holds listed image {img}; refusing to replace it with an index (name a new folder)")
    recover(p)  # an update killed in the middle of its swap: the index it left is put back first (its rows are reused)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise CbirError(f"{p}: exists and is not a folder; refusing to replace it with an index")
    if p.is_dir():
        try:
            entries = list(p.iterdir())
        except OSError as e:
            raise CbirError(f"{p}: cannot read the folder ({e.strerror})") from None
        if entries and not is_index_folder(p):
            other = next((e.name for e in entries if not owned_name(e.name) or not e.is_file()), entries[0].name)
            raise CbirError(f"{p}: holds files that are not a cbir index (e.g. {other}); refusing to replace it "
                            "(choose a new --out, or an existing index folder)")
    return p


def claim_work(work: Path, out: Path) -> None:
    """Create (or reuse) the work folder ``OUT.partial``; one that cbir did not make is refused, never cleared."""
    work = Path(work)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise CbirError(f"{work}: exists and is not a cbir work folder; move it away to build {out}")
    if work.is_dir():
        names = {p.name for p in work.iterdir()}
        if names and not names & {"work.json", BuildLock.NAME}:
            raise CbirError(f"{work}: exists and was not made by cbir (no work.json); move it away to build {out}")
        return
    try:
        work.mkdir(parents=True)
    except OSError as e:
        raise write_error(work, e) from None


def clear_work(work: Path) -> None:
    """Empty a work folder of another extractor's work, keeping the lock file of the running build."""
    for p in Path(work).iterdir():
        if p.name == BuildLock.NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def check_space(folder: os.PathLike, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes under ``folder`` when its file system has less free space."""
    try:
        free = shutil.disk_usage(existing_parent(Path(folder))).free
    except OSError:
        return
    if free < needed:
        raise WriteError(f"{folder}: not enough space for {what}: about {megabytes(needed)} needed, {megabytes(free)} free; "
                         "free some space or choose another --out")


def fresh_folder(path: Path) -> Path:
    """An empty folder at ``path`` (inside a work folder cbir owns): what was there is removed first."""
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir()
    except OSError as e:
        raise write_error(path, e) from None
    return path


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


class BuildLock:
    """An exclusive lock on a build's work folder (``flock`` on ``build.lock``): a second build into the same
    ``--out`` stops at once, naming the process that holds it. The OS drops the lock when that process dies,
    so a killed build never blocks the next one."""

    NAME = "build.lock"

    def __init__(self, work: Path, out: Path) -> None:
        self.path = Path(work) / self.NAME
        self.out = out
        self.fd: Optional[int] = None

    def acquire(self) -> "BuildLock":
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, builds are not guarded
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            raise Locked(f"another build or update (pid {pid}) is writing {self.out}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "BuildLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def commit_folder(work: Path, final: Path) -> None:
    """Move the finished ``work`` folder to ``final``; an existing index there is replaced as a whole.

    Only an empty folder or a cbir index folder is ever replaced (``check_out`` refused anything else before
    the build; checked again here, since the folder may have changed during a long build).
    """
    final = Path(final)
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise Kept(f"{final}: is no longer a folder; the new index is kept in {work}")
    if final.is_dir() and any(final.iterdir()) and not is_index_folder(final):
        raise Kept(f"{final}: files that are not a cbir index appeared during the build; the new index is kept in {work}")
    old = final.with_name(final.name + f".old-{os.getpid()}-{int(time.time())}")
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(work, final)
    except BaseException:
        if old.exists() and not final.exists():
            os.replace(old, final)
        raise
    drop_old_versions(final)  # this swap's old folder, and any a killed swap left behind


def _old_folders(folder: Path) -> List[Path]:
    """``FOLDER.old-PID-TIME`` folders that :func:`commit_folder` moved aside, newest first."""
    pat = re.compile(re.escape(folder.name) + r"\.old-(\d+)-(\d+)$")
    try:
        found = [(int(mt.group(2)), p) for p in folder.parent.iterdir() if (mt := pat.match(p.name)) and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []
    return [p for _, p in sorted(found, key=lambda t: (t[0], t[1].name), reverse=True)]


def drop_old_versions(folder: Path) -> List[str]:
    """Remove the ``FOLDER.old-PID-TIME`` index folders beside an index that is in place (a process killed after its swap
    left its old version there); run by the holder of the lock, after its swap or before its update. Returns their names."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return []  # the folder is missing: an old version may be what recover() puts back
    gone = []
    for o in _old_folders(folder):
        if is_index_folder(o):
            shutil.rmtree(o, ignore_errors=True)
            gone.append(o.name)
    return gone


def _complete_index(folder: Path) -> bool:
    """A folder holding a whole index: a valid manifest whose every recorded file is there with its size and SHA-256."""
    if not is_index_folder(folder):
        return False
    try:
        m = load_manifest(folder)
        for name in (m.get("files") or {}):
            verify_file(folder, name, m, full=True)
    except (CbirError, OSError, ValueError, KeyError, TypeError):
        return False
    return bool(m.get("files"))


def recover(folder: os.PathLike, wait_s: float = 10.0) -> Optional[Path]:
    """Put an index back at ``folder`` when a process died between the two renames of :func:`commit_folder` (``folder``
    missing, the new index complete in ``FOLDER.partial/commit``, the old one in ``FOLDER.old-PID-TIME``): the committed
    index when it is whole, else the newest old one; the superseded old folder is removed then (cbir made it).

    Runs under the build lock: while an update holds it (its own swap in progress) this waits up to ``wait_s`` for the
    folder to come back. Returns the folder that was moved into place, None when there was nothing to do."""
    folder = Path(os.path.abspath(folder))
    try:
        if folder.is_symlink() or (folder.exists() and (not folder.is_dir() or any(folder.iterdir()))):
            return None  # there is something at FOLDER (an index, or what check_out refuses)
    except OSError:
        return None
    work = partial_dir(folder)
    if not ((work / "commit" / MANIFEST).is_file() or _old_folders(folder)):
        return None
    lock = BuildLock(work, folder) if work.is_dir() else None
    deadline = time.monotonic() + max(0.0, wait_s)
    while lock is not None:
        try:
            lock.acquire()
            break
        except WriteError:
            lock = None  # a work folder that cannot take a lock (read-only): nobody else can write here either
        except Locked:
            if (folder / MANIFEST).exists():
                return None  # the holder finished its swap
            if time.monotonic() >= deadline:
                raise CbirError(f"{folder}: missing while another process holds the lock of {work}: an update is "
                                "replacing it; try again in a moment") from None
            time.sleep(0.05)
    try:
        if (folder / MANIFEST).exists():
            return None
        olds = _old_folders(folder)
        commit = work / "commit"
        pick = commit if _complete_index(commit) else next((o for o in olds if _complete_index(o)), None)
        if pick is None:
            return None
        try:
            if folder.is_dir():
                folder.rmdir()  # empty (checked above)
            os.replace(pick, folder)
        except OSError as e:
            raise CbirError(f"{folder}: missing after an interrupted update, and {pick} cannot be moved back in its place "
                            f"({e.strerror}); move it there yourself") from None
        for o in olds:
            if o != pick and is_index_folder(o):
                shutil.rmtree(o, ignore_errors=True)
        return pick
    finally:
        if lock is not None:
            lock.release()


def read_manifest(folder: os.PathLike) -> dict:
    """The checked manifest of the index at ``folder`` (:func:`cbir.index.manifest.load_manifest`), after putting back
    a folder an interrupted swap left missing; a folder without one is a one-line error saying what it is."""
    folder = Path(folder)
    p = folder / MANIFEST
    if not p.is_file():
        recover(folder)
    if not p.is_file():
        hint = ""
        if partial_dir(folder).exists():
            hint = f" (an unfinished build is in {partial_dir(folder)}: run the same `cbir index build` again to resume)"
        elif not folder.exists():
            hint = " (folder not found)"
        else:
            with contextlib.suppress(OSError):
                left = sorted(e.name for e in folder.iterdir() if e.name in OWNED_FILES)
                if left:  # an index's files without their manifest: damage, not some other folder
                    raise IndexDamaged(f"{p}: damaged (missing; the folder still holds {', '.join(left[:3])}) — rebuild the index")
        raise CbirError(f"{folder}: not a cbir index, no {MANIFEST}{hint}")
    return load_manifest(folder)


def locked_update(folder: os.PathLike, fn: Callable[[Path], T]) -> T:
    """``fn(work)`` under the lock of the index at ``folder`` (its work folder ``FOLDER.partial``, removed afterwards
    unless the new index is kept there): how an update (add, remove, compact, sync) runs; a second one is refused
    with the holder's pid (:class:`Locked`). Refused before any work: a folder that is not a cbir index, or that
    holds an entry a build did not write."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        read_manifest(folder)  # the one-line "not a cbir index" error
    stray = foreign_entry(folder)
    if stray is not None:  # checked before any work: the swap would refuse to replace this folder at the end
        raise CbirError(f"{folder}: holds {stray!r}, which is not part of a cbir index; move it out of the index folder "
                        "and run the update again (nothing was changed)")
    work = partial_dir(folder)
    claim_work(work, folder)
    with BuildLock(work, folder):
        drop_old_versions(folder)
        keep = False
        try:
            return fn(work)
        except Kept:
            keep = True  # the message names the work folder as where the new index is: it stays
            raise
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
