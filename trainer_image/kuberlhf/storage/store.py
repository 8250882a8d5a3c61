"""``ObjectStore``: whole-checkpoint upload/download with the commit protocol, over s3:// and file://.

Commit protocol (one prefix = one checkpoint):
1. a writer first deletes ``_COMPLETE`` (so a half-rewritten prefix is never readable as complete),
2. uploads every file (each S3 object stamped with its sha256, so a retried upload skips what is there),
3. writes ``manifest.json`` (path, size, sha256 of every file; producer; extra such as the config hash),
4. writes ``_COMPLETE`` last (its body holds the manifest's sha256).
Readers refuse a prefix without ``_COMPLETE`` and verify every file's size and sha256 after download.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kuberlhf.contract.stage import COMPLETE_MARKER, ENV_S3_SECRET_KEY, ENV_STORAGE_ENDPOINT, MANIFEST_FILE
from kuberlhf.storage.errors import ChecksumMismatchError, IncompleteCheckpointError, StorageError
from kuberlhf.storage.local import LocalBackend
from kuberlhf.storage.manifest import (
    PART_SUFFIX,
    FileEntry,
    Manifest,
    build_manifest,
    complete_marker_body,
    hash_files,
    list_local_files,
    marker_manifest_sha,
    parse_manifest,
    sha256_file,
    validate_rel_path,
)
from kuberlhf.storage.uri import ParsedUri, parse_uri

if TYPE_CHECKING:
    from kuberlhf.contract.spec import StorageSpec
    from kuberlhf.storage.s3 import S3Backend, TransferTuning

log = logging.getLogger("kuberlhf.storage")

_STEP_RE = re.compile(r"^step-(\d+)$")
_HEAD_WORKERS = 16


def _hash_workers() -> int:
    return min(8, (os.cpu_count() or 2) * 2)


def _entry_of(rel: str, path: Path) -> FileEntry:
    return FileEntry(path=rel, size=path.stat().st_size, sha256=sha256_file(path))


class ObjectNotFoundError(StorageError):
    """``get_bytes`` of an object that does not exist."""


class ObjectStore:
    """One store per endpoint configuration; methods take full URIs (s3://bucket/prefix or file:///dir).

    file:// URIs always work; s3:// URIs use the endpoint, region and addressing given at construction (endpoint
    default: KUBERLHF_STORAGE_ENDPOINT, then AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from ``env``, else AWS S3).
    Credentials come from ``env`` (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and are never logged or written.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        region: str | None = None,
        path_style: bool = True,
        env: Mapping[str, str] | None = None,
        tuning: TransferTuning | None = None,
    ) -> None:
        env = os.environ if env is None else env
        self.endpoint = (
            endpoint
            or env.get(ENV_STORAGE_ENDPOINT)
            or env.get("AWS_ENDPOINT_URL_S3")
            or env.get("AWS_ENDPOINT_URL")
            or None
        )
        self.region = region
        self.path_style = path_style
        self._env = dict(env)
        self._tuning = tuning
        self._s3: S3Backend | None = None
        self._local = LocalBackend()
        secret = env.get(ENV_S3_SECRET_KEY) or ""
        self._secret = secret if len(secret) >= 8 else ""
        # seconds per phase of the last upload_dir/download_dir (hash, transfer, verify, ...): for logs and bench/
        self.last_timings: dict[str, float] = {}

    # --- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_spec(
        cls, storage: StorageSpec, env: Mapping[str, str] | None = None, *, tuning: TransferTuning | None = None
    ) -> ObjectStore:
        """The store of ``spec.storage`` (endpoint, region, pathStyle); credentials from ``env``."""
        return cls(
            endpoint=storage.endpoint, region=storage.region, path_style=storage.path_style, env=env, tuning=tuning
        )

    @classmethod
    def from_uri(
        cls,
        uri: str,
        endpoint: str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        region: str | None = None,
        path_style: bool = True,
        tuning: TransferTuning | None = None,
    ) -> ObjectStore:
        parse_uri(uri)  # fail early on a malformed URI
        return cls(endpoint=endpoint, region=region, path_style=path_style, env=env, tuning=tuning)

    def _backend(self, target: ParsedUri) -> S3Backend | LocalBackend:
        if target.scheme == "file":
            return self._local
        if self._s3 is None:
            from kuberlhf.storage.s3 import S3Backend  # boto3 is only imported when s3:// is used

            self._s3 = S3Backend(
                endpoint=self.endpoint,
                region=self.region,
                path_style=self.path_style,
                env=self._env,
                tuning=self._tuning,
            )
        return self._s3

    # --- single objects --------------------------------------------------------------------------------------
    def put_bytes(self, uri: str, data: bytes) -> None:
        target = parse_uri(uri)
        self._backend(target).put_bytes(target, data)

    def get_bytes(self, uri: str) -> bytes:
        target = parse_uri(uri)
        data = self._backend(target).get_bytes(target)
        if data is None:
            raise ObjectNotFoundError(f"{uri} does not exist")
        return data

    def exists(self, uri: str) -> bool:
        target = parse_uri(uri)
        return self._backend(target).exists(target)

    def delete_prefix(self, uri: str) -> None:
        """Delete everything under the prefix, ``_COMPLETE`` first (a reader never sees a complete checkpoint
        that is missing files)."""
        target = parse_uri(uri)
        backend = self._backend(target)
        backend.delete(target.child(COMPLETE_MARKER))
        keys = sorted(backend.list_sizes(target))
        backend.delete_keys(target, keys)

    # --- commit protocol ----------------------------------------------------------------------------------------
    def is_complete(self, uri: str) -> bool:
        target = parse_uri(uri)
        return self._backend(target).exists(target.child(COMPLETE_MARKER))

    def read_manifest(self, uri: str) -> Manifest | None:
        """The committed manifest, or None when the prefix is not complete. Raises ChecksumMismatchError when
        manifest.json is not the one ``_COMPLETE`` was written for."""
        target = parse_uri(uri)
        backend = self._backend(target)
        marker = backend.get_bytes(target.child(COMPLETE_MARKER))
        if marker is None:
            return None
        data = backend.get_bytes(target.child(MANIFEST_FILE))
        if data is None:
            return None
        manifest = parse_manifest(data, source=f"{uri.rstrip('/')}/{MANIFEST_FILE}")
        expected = marker_manifest_sha(marker)
        if expected and expected != manifest.sha256:
            raise ChecksumMismatchError(MANIFEST_FILE, f"sha256 {expected}", f"sha256 {manifest.sha256}", uri=uri)
        return manifest

    def list_checkpoints(self, ckpt_root_uri: str) -> list[tuple[int, str]]:
        """Complete ``step-N`` prefixes under ``ckpt_root_uri`` as (N, uri), ascending by N."""
        root = parse_uri(ckpt_root_uri)
        backend = self._backend(root)
        steps: list[tuple[int, str]] = []
        for name in backend.list_children(root):
            m = _STEP_RE.match(name)
            if m:
                steps.append((int(m.group(1)), str(root.child(name))))
        if not steps:
            return []
        with ThreadPoolExecutor(max_workers=min(_HEAD_WORKERS, len(steps))) as pool:
            complete = list(pool.map(lambda s: self.is_complete(s[1]), steps))
        return sorted(s for s, ok in zip(steps, complete, strict=True) if ok)

    def upload_files(
        self, local_dir: str | os.PathLike[str], uri: str, *, paths: list[str] | None = None
    ) -> list[FileEntry]:
        """Upload the files of ``local_dir`` (only ``paths``, relative POSIX paths, when given) under ``uri``
        without committing (several writers: every rank uploads its own files, rank 0 merges the entries and calls
        :meth:`commit`). Objects already there with the same size and sha256 are skipped, so a retry after a
        crash only sends what is missing."""
        entries, paths = self._scan(local_dir, paths)
        target = parse_uri(uri)
        backend = self._backend(target)
        backend.check_bucket(target)
        backend.delete(target.child(COMPLETE_MARKER))
        self._upload(backend, target, entries, paths)
        return entries

    def commit(
        self, uri: str, entries: list[FileEntry], *, producer: str, extra: dict[str, Any] | None = None
    ) -> Manifest:
        """Write manifest.json then ``_COMPLETE`` for files already uploaded under ``uri``; checks first that
        every entry is there with its size."""
        target = parse_uri(uri)
        backend = self._backend(target)
        manifest = build_manifest(entries, producer=producer, extra=extra)
        body = manifest.to_json_bytes()
        if self._secret and self._secret.encode() in body:
            raise StorageError(
                f"refusing to commit {uri}: the manifest's extra holds the value of {ENV_S3_SECRET_KEY}; "
                "credentials never go into manifests"
            )
        present = backend.list_sizes(target)
        for e in manifest.files:
            size = present.get(e.path)
            if size is None:
                raise StorageError(f"cannot commit {uri}: {e.path!r} was not uploaded (missing in the store)")
            if size != e.size:
                raise ChecksumMismatchError(e.path, f"size {e.size}", f"size {size}", uri=uri)
        backend.delete(target.child(COMPLETE_MARKER))
        backend.put_bytes(target.child(MANIFEST_FILE), body)
        backend.put_bytes(target.child(COMPLETE_MARKER), complete_marker_body(manifest))
        log.info(
            "committed %s: %d files, %.1f MiB (manifest %s)",
            uri,
            len(entries),
            manifest.total_bytes / 2**20,
            manifest.sha256[:12],
        )
        return manifest

    def upload_dir(
        self,
        local_dir: str | os.PathLike[str],
        uri: str,
        *,
        producer: str,
        extra: dict[str, Any] | None = None,
        commit: bool = True,
    ) -> Manifest:
        """Upload a whole directory and (by default) commit it. A second upload of the same content to an
        already committed prefix is skipped and returns the committed manifest."""
        t0 = time.monotonic()
        entries, paths = self._scan(local_dir)
        timings = self.last_timings = {"hash": time.monotonic() - t0}
        target = parse_uri(uri)
        backend = self._backend(target)
        backend.check_bucket(target)
        if commit:
            try:
                current = self.read_manifest(uri)
            except (ChecksumMismatchError, StorageError):
                current = None  # unreadable: rewrite it
            wanted = build_manifest(entries, producer=producer, extra=extra)
            if current is not None and current.same_content(wanted):
                log.info("%s already holds this checkpoint (manifest %s): upload skipped", uri, current.sha256[:12])
                return current
        backend.delete(target.child(COMPLETE_MARKER))
        t1 = time.monotonic()
        sent = self._upload(backend, target, entries, paths, timings)
        timings["transfer"] = time.monotonic() - t1
        dt = time.monotonic() - t0
        log.info(
            "uploaded %s -> %s: %d/%d files, %.1f MiB in %.2fs",
            local_dir,
            uri,
            sent,
            len(entries),
            sum(e.size for e in entries) / 2**20,
            dt,
        )
        if not commit:
            return build_manifest(entries, producer=producer, extra=extra)
        t2 = time.monotonic()
        manifest = self.commit(uri, entries, producer=producer, extra=extra)
        timings["commit"] = time.monotonic() - t2
        return manifest

    def download_dir(self, uri: str, local_dir: str | os.PathLike[str]) -> Manifest:
        """Download a committed checkpoint; refuses one without ``_COMPLETE``; verifies every file's size and
        sha256 (ChecksumMismatchError naming the file); files already present and verified are skipped."""
        t0 = time.monotonic()
        target = parse_uri(uri)
        backend = self._backend(target)
        manifest = self.read_manifest(uri)
        if manifest is None:
            if backend.exists(target.child(COMPLETE_MARKER)):
                raise IncompleteCheckpointError(uri, f"{MANIFEST_FILE} is missing")
            raise IncompleteCheckpointError(uri)
        root = Path(local_dir)
        root.mkdir(parents=True, exist_ok=True)
        for e in manifest.files:
            validate_rel_path(e.path)

        def present(entry: FileEntry) -> bool:
            path = root / entry.path
            try:
                if path.stat().st_size != entry.size:
                    return False
            except FileNotFoundError:
                return False
            return sha256_file(path) == entry.sha256

        timings = self.last_timings = {"manifest": time.monotonic() - t0}
        t1 = time.monotonic()
        with ThreadPoolExecutor(max_workers=_hash_workers()) as pool:
            have = list(pool.map(present, manifest.files))
        timings["check_local"] = time.monotonic() - t1
        todo = [e for e, ok in zip(manifest.files, have, strict=True) if not ok]
        parts = [(e, root / (e.path + PART_SUFFIX)) for e in todo]
        for _e, part in parts:
            part.parent.mkdir(parents=True, exist_ok=True)
        t2 = time.monotonic()
        # each file is hashed as soon as it is on disk, overlapping verification with the other transfers
        with ThreadPoolExecutor(max_workers=_hash_workers(), thread_name_prefix="kuberlhf-verify") as pool:
            hashed: dict[int, Future[FileEntry]] = {}
            lock = threading.Lock()

            def verify_later(i: int) -> None:
                e, part = parts[i]
                with lock:
                    if i not in hashed:
                        hashed[i] = pool.submit(_entry_of, e.path, part)

            backend.download_files([(target.child(e.path), part) for e, part in parts], verify_later)
            timings["transfer"] = time.monotonic() - t2
            t3 = time.monotonic()
            for i in range(len(parts)):
                verify_later(i)  # no-op for files already being hashed
            checked = [hashed[i].result() for i in range(len(parts))]
        # verify before anything gets its final name: a corrupt file is never left where a loader would find it
        bad = [
            (e, got)
            for (e, _p), got in zip(parts, checked, strict=True)
            if (got.size, got.sha256) != (e.size, e.sha256)
        ]
        if bad:
            for _e, part in parts:
                part.unlink(missing_ok=True)
            e, got = bad[0]
            others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise ChecksumMismatchError(
                e.path + others, f"size {e.size} sha256 {e.sha256}", f"size {got.size} sha256 {got.sha256}", uri=uri
            )
        for e, part in parts:
            os.replace(part, root / e.path)
        timings["verify"] = time.monotonic() - t3
        dt = time.monotonic() - t0
        log.info(
            "downloaded %s -> %s: %d/%d files (%.1f MiB) in %.2fs",
            uri,
            local_dir,
            len(todo),
            len(manifest.files),
            sum(e.size for e in todo) / 2**20,
            dt,
        )
        return manifest

    # --- internals ---------------------------------------------------------------------------------------------
    @staticmethod
    def _scan(
        local_dir: str | os.PathLike[str], only: list[str] | None = None
    ) -> tuple[list[FileEntry], dict[str, Path]]:
        files = list_local_files(local_dir)
        if only is not None:
            wanted = set(only)
            files = [f for f in files if f[0] in wanted]
            missing = wanted - {rel for rel, _ in files}
            if missing:
                raise StorageError(f"cannot upload {sorted(missing)} from {local_dir}: not there")
        return hash_files(files), dict(files)

    def _upload(
        self,
        backend: S3Backend | LocalBackend,
        target: ParsedUri,
        entries: list[FileEntry],
        paths: dict[str, Path],
        timings: dict[str, float] | None = None,
    ) -> int:
        """Upload what is not already there (same size + sha256); returns the number of files sent."""
        existing = backend.list_sizes(target)
        maybe = [e for e in entries if existing.get(e.path) == e.size]
        skip: set[str] = set()
        if maybe:
            with ThreadPoolExecutor(max_workers=min(_HEAD_WORKERS, len(maybe))) as pool:
                matches = list(pool.map(lambda e: backend.remote_matches(target.child(e.path), e), maybe))
            skip = {e.path for e, ok in zip(maybe, matches, strict=True) if ok}
        todo = [(paths[e.path], target.child(e.path), e) for e in entries if e.path not in skip]
        t0 = time.monotonic()
        backend.upload_files(todo)
        if timings is not None:
            timings["send"] = time.monotonic() - t0
        return len(todo)
