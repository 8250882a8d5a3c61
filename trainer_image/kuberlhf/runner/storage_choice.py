"""Which object store a local run uses: the manifest's, when this machine can reach it, else an embedded
SeaweedFS server. The decision is a pure function of the spec, the environment and a reachability probe so it
is unit-tested without a network."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from enum import Enum
from urllib.parse import urlparse

from kuberlhf.contract.spec import StorageSpec
from kuberlhf.contract.stage import ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY


class StorageMode(str, Enum):
    auto = "auto"  # the manifest's store when reachable, else embedded
    embedded = "embedded"  # always the embedded SeaweedFS under <output-dir>/.s3
    manifest = "manifest"  # always the manifest's store (fail if unreachable)


@dataclass(frozen=True)
class StorageChoice:
    embedded: bool
    reason: str


def bucket_of(uri: str) -> str:
    """'s3://bucket/prefix' -> 'bucket'."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI with a bucket: {uri!r}")
    return parsed.netloc


def endpoint_reachable(endpoint: str, timeout: float = 1.5) -> bool:
    """True when a TCP connection to the endpoint's host:port opens (DNS included) within ``timeout``."""
    parsed = urlparse(endpoint)
    if not parsed.hostname:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    # name resolution ignores socket timeouts (a resolver without network can hang for many seconds): bound it
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        addrs = pool.submit(socket.getaddrinfo, parsed.hostname, port, type=socket.SOCK_STREAM).result(timeout)
    except (OSError, FutureTimeout):
        return False
    finally:
        pool.shutdown(wait=False)
    for family, kind, proto, _, addr in addrs:
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(timeout)
                sock.connect(addr)
                return True
        except OSError:
            continue
    return False


def choose_storage(
    storage: StorageSpec,
    env: Mapping[str, str],
    mode: StorageMode = StorageMode.auto,
    reachable: Callable[[str], bool] = endpoint_reachable,
) -> StorageChoice:
    """Decide between the manifest's store and the embedded server, with a reason to print."""
    if storage.uri.startswith("file://"):
        if mode is StorageMode.embedded:
            return StorageChoice(True, "--storage embedded given")
        return StorageChoice(False, f"storage.uri is a local directory ({storage.uri})")
    if mode is StorageMode.embedded:
        return StorageChoice(True, "--storage embedded given")
    has_creds = bool(env.get(ENV_S3_ACCESS_KEY) and env.get(ENV_S3_SECRET_KEY))
    if storage.endpoint:
        if reachable(storage.endpoint):
            if not has_creds:
                # the store answers but we have nothing to sign with: fail later with a clear auth error
                # rather than silently writing elsewhere
                return StorageChoice(False, f"storage.endpoint {storage.endpoint} is reachable "
                                            f"(set {ENV_S3_ACCESS_KEY}/{ENV_S3_SECRET_KEY} for it)")
            return StorageChoice(False, f"storage.endpoint {storage.endpoint} is reachable")
        if mode is StorageMode.manifest:
            raise ValueError(f"storage.endpoint {storage.endpoint} is not reachable from this machine "
                             "(--storage manifest forbids the embedded server); check the URL or use --storage auto")
        return StorageChoice(True, f"storage.endpoint {storage.endpoint} is not reachable from this machine "
                                   "(an in-cluster address?)")
    # no endpoint means AWS S3: usable only with credentials in the environment
    if has_creds or mode is StorageMode.manifest:
        return StorageChoice(False, "storage has no endpoint: AWS S3 with the credentials in the environment")
    return StorageChoice(True, f"storage has no endpoint (AWS S3) and {ENV_S3_ACCESS_KEY} is not set")
