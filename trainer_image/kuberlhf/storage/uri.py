"""Parsing and joining of checkpoint URIs (``s3://bucket/prefix``, ``file:///dir``). Pure functions."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from kuberlhf.storage.errors import StorageError


@dataclass(frozen=True)
class ParsedUri:
    """``scheme`` is "s3" or "file". For s3, ``bucket`` and ``key`` (no leading/trailing slash); for file,
    ``key`` is the absolute local path (no trailing slash) and ``bucket`` is empty."""

    scheme: str
    bucket: str
    key: str

    def child(self, rel: str) -> ParsedUri:
        rel = rel.strip("/")
        if not rel:
            return self
        joined = f"{self.key}/{rel}" if self.key else rel
        if self.scheme == "file" and self.key == "/":
            joined = "/" + rel
        return ParsedUri(self.scheme, self.bucket, joined)

    @property
    def prefix(self) -> str:
        """The key prefix of everything "under" this URI (with a trailing slash, so step-1 != step-10)."""
        return f"{self.key}/" if self.key else ""

    def __str__(self) -> str:
        if self.scheme == "s3":
            return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"
        return f"file://{self.key}"


def parse_uri(uri: str) -> ParsedUri:
    """``s3://bucket[/prefix]``, ``file:///abs/dir`` or a plain local path (taken as file://)."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"empty storage URI {uri!r}: use s3://bucket/prefix or file:///dir")
    uri = uri.strip()
    if "://" not in uri:
        return ParsedUri("file", "", _norm_path(os.path.abspath(os.path.expanduser(uri))))
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise StorageError(f"storage URI {uri!r} has no bucket: use s3://bucket/prefix")
        return ParsedUri("s3", bucket, parts.path.strip("/"))
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StorageError(f"file URI {uri!r} names host {parts.netloc!r}: use file:///absolute/dir")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise StorageError(f"file URI {uri!r} is not absolute: use file:///absolute/dir")
        return ParsedUri("file", "", _norm_path(path))
    raise StorageError(f"unsupported storage URI scheme {scheme!r} in {uri!r}: use s3://bucket/prefix or file:///dir")


def join_uri(uri: str, *parts: str) -> str:
    """``join_uri("s3://b/x", "model", "config.json") == "s3://b/x/model/config.json"``."""
    out = uri.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def _norm_path(path: str) -> str:
    norm = os.path.normpath(path)
    return norm if norm == "/" else norm.rstrip("/")
