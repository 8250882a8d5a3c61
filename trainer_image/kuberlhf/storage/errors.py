"""Errors of the storage layer. Every message names the object or endpoint and the fix; none holds a secret."""

from __future__ import annotations


class StorageError(RuntimeError):
    """Base class: something about the checkpoint store went wrong."""


class IncompleteCheckpointError(StorageError):
    """The prefix has no ``_COMPLETE`` marker: its producer is still writing it, crashed, or never ran."""

    def __init__(self, uri: str, detail: str = "") -> None:
        self.uri = uri
        msg = (
            f"{uri} is not a complete checkpoint (no _COMPLETE marker): its producer has not committed it "
            "(still running, crashed mid-upload, or never ran); rerun the producing stage"
        )
        super().__init__(msg + (f"; {detail}" if detail else ""))


class ChecksumMismatchError(StorageError):
    """A file's size or sha256 differs from what the committed manifest says."""

    def __init__(self, path: str, expected: str, actual: str, *, uri: str = "") -> None:
        self.path = path
        self.expected = expected
        self.actual = actual
        self.uri = uri
        where = f" of {uri}" if uri else ""
        super().__init__(
            f"checksum mismatch for {path!r}{where}: manifest says {expected}, got {actual}; the stored object is "
            "corrupt or was overwritten outside the commit protocol; rerun the producing stage to rewrite it"
        )


class StorageAuthError(StorageError):
    """The store rejected (or we have no) credentials."""


class StorageTransientError(StorageError):
    """The store may well answer if asked again later (an outage, a 5xx, throttling): retried, never blamed on
    the user's configuration."""


class StorageUnreachableError(StorageTransientError):
    """The endpoint cannot be reached (refused, DNS, timeout)."""


class BucketNotFoundError(StorageError):
    """The bucket in the URI does not exist on the endpoint."""
