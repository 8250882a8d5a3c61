"""The checkpoint manifest: every file's relative path, size and sha256, plus who produced it.

``manifest.json`` is written after all files and before ``_COMPLETE``; its sha256 (``Manifest.sha256``) goes
into the body of ``_COMPLETE`` and into the pipeline status, so a reader can tell which exact checkpoint it got.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kuberlhf.contract.stage import COMPLETE_MARKER, MANIFEST_FILE
from kuberlhf.storage.errors import StorageError

MANIFEST_FORMAT = "kuberlhf.manifest/v1"
PART_SUFFIX = ".kuberlhf-part"  # in-flight downloads / file:// writes; never part of a checkpoint
_HASH_BLOCK = 4 << 20
# Top-level files that belong to the protocol, not to the checkpoint (nested ones, e.g. a stage dir holding
# ckpt/step-N/_COMPLETE, are ordinary files of the outer checkpoint).
PROTOCOL_FILES = frozenset({MANIFEST_FILE, COMPLETE_MARKER})


class FileEntry(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str = Field(description="Relative POSIX path inside the checkpoint.")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str = MANIFEST_FORMAT
    producer: str = Field(description="The stage (or tool) that wrote the checkpoint.")
    created: str = Field(description="UTC ISO-8601 time of the commit.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Producer facts, e.g. configSha256, step.")
    files: list[FileEntry]
    total_bytes: int = 0
    # digest of the manifest.json bytes; not part of the document itself
    sha256: str = Field(default="", exclude=True)

    def to_json_bytes(self) -> bytes:
        return (json.dumps(self.model_dump(), indent=1, sort_keys=True) + "\n").encode()

    def by_path(self) -> dict[str, FileEntry]:
        return {e.path: e for e in self.files}

    def same_content(self, other: Manifest) -> bool:
        """Same files (path, size, sha256), producer and extra: a re-upload would change nothing."""
        return (
            sorted(self.files, key=lambda e: e.path) == sorted(other.files, key=lambda e: e.path)
            and self.producer == other.producer
            and self.extra == other.extra
        )


def build_manifest(entries: Iterable[FileEntry], *, producer: str, extra: dict[str, Any] | None = None) -> Manifest:
    files = sorted(entries, key=lambda e: e.path)
    seen: set[str] = set()
    for e in files:
        if e.path in seen:
            raise StorageError(f"file {e.path!r} appears twice in the entries to commit (two nodes wrote it?)")
        seen.add(e.path)
        validate_rel_path(e.path)
    m = Manifest(
        producer=producer,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        extra=dict(extra or {}),
        files=files,
        total_bytes=sum(e.size for e in files),
    )
    m.sha256 = hashlib.sha256(m.to_json_bytes()).hexdigest()
    return m


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    try:
        m = Manifest.model_validate_json(data)
    except ValidationError as e:
        raise StorageError(f"{source} is not a valid kuberlhf manifest: {e}") from e
    if m.format != MANIFEST_FORMAT:
        raise StorageError(f"{source} has manifest format {m.format!r}; this kuberlhf reads {MANIFEST_FORMAT!r}")
    m.sha256 = hashlib.sha256(data).hexdigest()
    return m


def complete_marker_body(manifest: Manifest) -> bytes:
    return (
        json.dumps({"manifestSha256": manifest.sha256, "files": len(manifest.files)}, sort_keys=True) + "\n"
    ).encode()


def marker_manifest_sha(body: bytes) -> str | None:
    """The manifest digest recorded in a ``_COMPLETE`` body (None for an empty/foreign marker)."""
    try:
        value = json.loads(body or b"null")
    except ValueError:
        return None
    return value.get("manifestSha256") if isinstance(value, dict) else None


def validate_rel_path(rel: str) -> None:
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in rel.split("/")):
        raise StorageError(f"manifest path {rel!r} is not a clean relative path")


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_HASH_BLOCK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])  # hashlib releases the GIL on large updates: threads hash in parallel
    return h.hexdigest()


def list_local_files(local_dir: str | os.PathLike[str]) -> list[tuple[str, Path]]:
    """(relative POSIX path, absolute path) of every file to ship, sorted; protocol files at the top level and
    in-flight temp files are left out."""
    root = Path(local_dir)
    if not root.is_dir():
        raise StorageError(f"local checkpoint directory {str(root)!r} does not exist or is not a directory")
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.endswith(PART_SUFFIX):
                continue
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel in PROTOCOL_FILES:
                continue
            if not full.is_file():
                continue
            out.append((rel, full))
    out.sort()
    return out


def hash_files(files: list[tuple[str, Path]], workers: int | None = None) -> list[FileEntry]:
    """FileEntry of each (rel, path), hashed in parallel threads."""
    workers = workers or min(8, (os.cpu_count() or 2) * 2)

    def one(item: tuple[str, Path]) -> FileEntry:
        rel, full = item
        size = full.stat().st_size
        return FileEntry(path=rel, size=size, sha256=sha256_file(full))

    if len(files) <= 1:
        return [one(f) for f in files]
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kuberlhf-hash") as pool:
        return list(pool.map(one, files))


def scan_dir(local_dir: str | os.PathLike[str]) -> list[FileEntry]:
    """FileEntry (path, size, sha256) of every file of a local checkpoint directory."""
    return hash_files(list_local_files(local_dir))


def verify_local_file(path: Path, entry: FileEntry) -> str | None:
    """None when ``path`` holds exactly ``entry``; else a short description of what differs."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    if size != entry.size:
        return f"size {size}"
    digest = sha256_file(path)
    return None if digest == entry.sha256 else f"sha256 {digest}"
