"""Checkpoint hand-off through S3-compatible object storage (and file://), with a commit protocol that makes a
half-written checkpoint unreadable. Light: boto3 and pydantic only, never torch (the operator imports this)."""

from kuberlhf.storage.errors import (
    BucketNotFoundError,
    ChecksumMismatchError,
    IncompleteCheckpointError,
    StorageAuthError,
    StorageError,
    StorageTransientError,
    StorageUnreachableError,
)
from kuberlhf.storage.manifest import FileEntry, Manifest, scan_dir
from kuberlhf.storage.store import ObjectNotFoundError, ObjectStore
from kuberlhf.storage.uri import join_uri, parse_uri

__all__ = [
    "BucketNotFoundError",
    "ChecksumMismatchError",
    "FileEntry",
    "IncompleteCheckpointError",
    "Manifest",
    "ObjectNotFoundError",
    "ObjectStore",
    "StorageAuthError",
    "StorageError",
    "StorageTransientError",
    "StorageUnreachableError",
    "join_uri",
    "parse_uri",
    "scan_dir",
]
