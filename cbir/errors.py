"""Errors a user can act on. The CLI prints them as one line, without a traceback."""


class CbirError(Exception):
    """Base class of every error cbir raises for bad input, missing files or mismatched indexes."""


class DecodeError(CbirError):
    """An image file could not be read: names the file and the cause."""

    def __init__(self, path: str, cause: str) -> None:
        super().__init__(f"{path}: {cause}")
        self.path = str(path)
        self.cause = cause


class WeightsNotFound(CbirError):
    """No weight file where cbir looks for it; the message says where to put one."""


class IndexMismatch(CbirError):
    """A query or feature does not fit the index (extractor, dimension, kind)."""


class IndexDamaged(CbirError):
    """An index file is missing, truncated, altered or unreadable; the message names it and how to rebuild."""


def query_failed(failures, path, pos: int, err: CbirError) -> None:
    """Record an unreadable query in the list ``failures`` (raise when it is None: the caller wants no partial answers).
    An index-level mismatch always raises, as every other query would fail the same way."""
    if failures is None or isinstance(err, IndexMismatch):
        raise err
    failures.append({"path": str(path), "cause": getattr(err, "cause", None) or str(err), "position": pos})
