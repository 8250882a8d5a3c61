"""The S3 backend: boto3 client + boto3's transfer manager (multipart, parallel, retried), and the translation
of botocore errors into storage errors that name the endpoint and the fix."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from s3transfer.subscribers import BaseSubscriber

from kuberlhf.contract.stage import ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY
from kuberlhf.storage.errors import (
    BucketNotFoundError,
    StorageAuthError,
    StorageError,
    StorageTransientError,
    StorageUnreachableError,
)
from kuberlhf.storage.manifest import FileEntry
from kuberlhf.storage.uri import ParsedUri

log = logging.getLogger(__name__)

SHA256_META = "kuberlhf-sha256"  # object metadata: lets a retried upload skip objects that are already there
MiB = 1 << 20
_AUTH_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "403",
    "Forbidden",
}
_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# Answers that say "not now" rather than "never": the store is overloaded, restarting or throttling.
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling",
                    "ThrottlingException"}


@dataclass(frozen=True)
class TransferTuning:
    """Transfer-manager knobs. Measured with bench/transfer_bench.py (SeaweedFS on loopback, 2 shared cores): chunk
    size (8-64 MiB, or no multipart) and concurrency (4-16) change neither throughput beyond the noise nor the
    CPU cost, which is the server's (MD5 for the ETag is ~45% of weed's CPU on upload). So: 32 MiB parts (few
    requests for multi-GB shards, well under S3's 10,000-part limit up to 320 GB per file), 16 threads for big
    nodes, and a bounded download queue (max_io_queue x io_chunksize = 64 MiB of RAM at most when the disk is
    slower than the network)."""

    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 32 * MiB
    max_concurrency: int = 16
    max_io_queue: int = 64
    io_chunksize: int = 1 * MiB
    max_attempts: int = 8
    retry_mode: str = "adaptive"
    connect_timeout: float = 5.0
    read_timeout: float = 120.0

    def transfer_config(self) -> TransferConfig:
        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_concurrency=self.max_concurrency,
            max_io_queue=self.max_io_queue,
            io_chunksize=self.io_chunksize,
            num_download_attempts=self.max_attempts,
            use_threads=True,
            preferred_transfer_client="classic",  # predictable everywhere (CRT may be absent)
        )


def _mask(access_key: str | None) -> str:
    if not access_key:
        return "<unset>"
    return access_key[:4] + "…" if len(access_key) > 8 else "…"


class S3Backend:
    scheme = "s3"

    def __init__(
        self,
        *,
        endpoint: str | None,
        region: str | None,
        path_style: bool,
        env: Mapping[str, str],
        tuning: TransferTuning | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.tuning = tuning or TransferTuning()
        access_key = env.get(ENV_S3_ACCESS_KEY) or None
        secret_key = env.get(ENV_S3_SECRET_KEY) or None
        self._access_key_hint = _mask(access_key)
        self._secret_for_redaction = secret_key
        # Credentials come from the given env only; if it has none, boto3's default chain (IRSA, instance
        # profile, ~/.aws) applies, which is what AWS users expect.
        session = boto3.session.Session(
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            region_name=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        )
        config = Config(
            s3={"addressing_style": "path" if path_style else "auto"},
            # boto3 >= 1.36 sends CRC trailers by default, which several S3-compatible stores reject
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": self.tuning.retry_mode, "max_attempts": self.tuning.max_attempts},
            connect_timeout=self.tuning.connect_timeout,
            read_timeout=self.tuning.read_timeout,
            max_pool_connections=max(10, self.tuning.max_concurrency * 2),
            tcp_keepalive=True,
        )
        self.client = session.client("s3", endpoint_url=endpoint, config=config)

    @property
    def label(self) -> str:
        return self.endpoint or "AWS S3"

    # --- error translation ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except StorageError:
            raise
        except Exception as e:  # noqa: BLE001 - translated below or re-raised
            raise self.translate(e, what) from e

    def translate(self, exc: BaseException, what: str) -> BaseException:
        """A storage error for ``exc`` (walking its cause chain: the transfer manager wraps botocore errors)."""
        seen: set[int] = set()
        cur: BaseException | None = exc
        while cur is not None and id(cur) not in seen:
            seen.add(id(cur))
            mapped = self._translate_one(cur, what)
            if mapped is not None:
                return mapped
            cur = cur.__cause__ or cur.__context__
        return StorageError(self._redact(f"{what} failed at {self.label}: {type(exc).__name__}: {exc}"))

    def _translate_one(self, exc: BaseException, what: str) -> StorageError | None:
        if isinstance(exc, StorageError):
            return exc
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageAuthError(
                f"{what}: no S3 credentials: set {ENV_S3_ACCESS_KEY} and {ENV_S3_SECRET_KEY} (on Kubernetes: the keys "
                "of the Secret named in spec.storage.secretRef)"
            )
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError)):
            return StorageUnreachableError(
                f"{what}: cannot reach the S3 endpoint {self.label} ({type(exc).__name__}): check "
                "spec.storage.endpoint and that the server is running and reachable from here"
            )
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _AUTH_CODES or status == 403:
                return StorageAuthError(
                    f"{what}: the S3 endpoint {self.label} rejected the credentials ({code or status}; access key "
                    f"{self._access_key_hint}): check {ENV_S3_ACCESS_KEY} / {ENV_S3_SECRET_KEY} (on Kubernetes: "
                    "the Secret named in spec.storage.secretRef) and that this key may use the bucket"
                )
            if code == "NoSuchBucket":
                bucket = err.get("BucketName") or ""
                return BucketNotFoundError(
                    f"{what}: bucket {bucket!r} does not exist at {self.label}: create it, or fix the bucket in "
                    "spec.storage.uri"
                )
            if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                return StorageTransientError(
                    self._redact(f"{what}: the S3 endpoint {self.label} is unavailable ({code or status}): {exc}")
                )
            return StorageError(self._redact(f"{what} failed at {self.label}: {code or status}: {exc}"))
        if isinstance(exc, BotoCoreError):
            return StorageError(self._redact(f"{what} failed at {self.label}: {exc}"))
        return None

    def _redact(self, text: str) -> str:
        if self._secret_for_redaction:
            text = text.replace(self._secret_for_redaction, "<redacted>")
        return text

    # --- single objects --------------------------------------------------------------------------------------
    def check_bucket(self, target: ParsedUri) -> None:
        """Fail early with a clear error when the endpoint, credentials or bucket are wrong."""
        with self.errors(f"checking bucket s3://{target.bucket}"):
            try:
                self.client.head_bucket(Bucket=target.bucket)
            except ClientError as e:
                code = str(e.response.get("Error", {}).get("Code", ""))
                if code in ("404", "NoSuchBucket", "NotFound"):
                    raise BucketNotFoundError(
                        f"bucket {target.bucket!r} does not exist at {self.label}: create it, or fix the bucket "
                        "in spec.storage.uri"
                    ) from e
                raise

    def put_bytes(self, target: ParsedUri, data: bytes) -> None:
        with self.errors(f"writing {target}"):
            self.client.put_object(Bucket=target.bucket, Key=target.key, Body=data)

    def get_bytes(self, target: ParsedUri) -> bytes | None:
        with self.errors(f"reading {target}"):
            try:
                resp = self.client.get_object(Bucket=target.bucket, Key=target.key)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES:
                    return None
                raise
            return resp["Body"].read()

    def head(self, target: ParsedUri) -> dict | None:
        with self.errors(f"looking up {target}"):
            try:
                return self.client.head_object(Bucket=target.bucket, Key=target.key)
            except ClientError as e:
                if str(e.response.get("Error", {}).get("Code", "")) in _NOT_FOUND_CODES:
                    return None
                raise

    def exists(self, target: ParsedUri) -> bool:
        return self.head(target) is not None

    def delete(self, target: ParsedUri) -> None:
        with self.errors(f"deleting {target}"):
            self.client.delete_object(Bucket=target.bucket, Key=target.key)

    def remote_matches(self, target: ParsedUri, entry: FileEntry) -> bool:
        """True when the object exists with this size and the sha256 we stamped on it when uploading it."""
        meta = self.head(target)
        if meta is None:
            return False
        return (
            int(meta.get("ContentLength", -1)) == entry.size
            and meta.get("Metadata", {}).get(SHA256_META) == entry.sha256
        )

    # --- listings ----------------------------------------------------------------------------------------------
    def list_sizes(self, target: ParsedUri) -> dict[str, int]:
        """{relative key: size} of every object under the prefix."""
        out: dict[str, int] = {}
        prefix = target.prefix
        with self.errors(f"listing {target}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=target.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out[obj["Key"][len(prefix) :]] = int(obj["Size"])
        return out

    def list_children(self, target: ParsedUri) -> list[str]:
        """Names of the immediate "sub-directories" under the prefix."""
        prefix = target.prefix
        names: list[str] = []
        with self.errors(f"listing {target}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=target.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                for cp in page.get("CommonPrefixes", []):
                    names.append(cp["Prefix"][len(prefix) :].rstrip("/"))
        return names

    def delete_keys(self, target: ParsedUri, rel_keys: list[str]) -> None:
        with self.errors(f"deleting under {target}"):
            for i in range(0, len(rel_keys), 1000):
                batch = [{"Key": target.child(k).key} for k in rel_keys[i : i + 1000]]
                resp = self.client.delete_objects(Bucket=target.bucket, Delete={"Objects": batch, "Quiet": True})
                if resp.get("Errors"):
                    first = resp["Errors"][0]
                    raise StorageError(
                        f"deleting under {target} failed for {len(resp['Errors'])} objects, e.g. {first.get('Key')}: "
                        f"{first.get('Code')} {first.get('Message')}"
                    )

    # --- bulk transfers (boto3 transfer manager) ---------------------------------------------------------------
    def upload_files(self, items: list[tuple[Path, ParsedUri, FileEntry]]) -> None:
        """Upload every (local file, target, entry) concurrently; each object carries its sha256 as metadata."""
        if not items:
            return
        with (
            self.errors(f"uploading {len(items)} files"),
            create_transfer_manager(self.client, self.tuning.transfer_config()) as manager,
        ):
            futures = [
                manager.upload(
                    str(local),
                    target.bucket,
                    target.key,
                    extra_args={"Metadata": {SHA256_META: entry.sha256}},
                )
                for local, target, entry in items
            ]
            for fut in futures:
                fut.result()

    def download_files(
        self, items: list[tuple[ParsedUri, Path]], on_file_done: Callable[[int], None] | None = None
    ) -> None:
        """Download every (source, local file) concurrently (the transfer manager writes to a temp name and
        renames it into place itself). ``on_file_done(i)`` runs as soon as item ``i`` is on disk, so the caller
        can verify it while the others are still transferring."""
        if not items:
            return
        with (
            self.errors(f"downloading {len(items)} files"),
            create_transfer_manager(self.client, self.tuning.transfer_config()) as manager,
        ):
            futures = [
                manager.download(
                    src.bucket,
                    src.key,
                    str(dest),
                    subscribers=[_DoneSubscriber(i, on_file_done)] if on_file_done else None,
                )
                for i, (src, dest) in enumerate(items)
            ]
            for fut in futures:
                fut.result()


class _DoneSubscriber(BaseSubscriber):
    def __init__(self, index: int, callback: Callable[[int], None]) -> None:
        self.index = index
        self.callback = callback

    def on_done(self, future, **kwargs) -> None:  # noqa: ANN001 - s3transfer's signature
        try:
            future.result()
        except BaseException:  # noqa: BLE001 - the failure surfaces from fut.result() in download_files
            return
        self.callback(self.index)
