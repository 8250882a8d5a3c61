"""Which object store a local run uses (pure decision, no network)."""

from __future__ import annotations

import socket

import pytest

from kuberlhf.contract.spec import StorageSpec
from kuberlhf.runner.storage_choice import StorageMode, bucket_of, choose_storage, endpoint_reachable

CREDS = {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}


def spec(**kw) -> StorageSpec:
    return StorageSpec(**{"uri": "s3://kuberlhf/pipelines", **kw})


def test_unreachable_endpoint_means_embedded_with_a_reason() -> None:
    c = choose_storage(spec(endpoint="http://seaweedfs.kuberlhf:8333"), CREDS, reachable=lambda _: False)
    assert c.embedded and "seaweedfs.kuberlhf:8333 is not reachable" in c.reason


def test_reachable_endpoint_is_used() -> None:
    c = choose_storage(spec(endpoint="http://minio:9000"), CREDS, reachable=lambda _: True)
    assert not c.embedded


def test_file_uri_needs_no_server() -> None:
    assert not choose_storage(spec(uri="file:///tmp/x"), {}, reachable=lambda _: False).embedded


def test_aws_without_credentials_is_embedded_and_with_them_is_used() -> None:
    assert choose_storage(spec(), {}).embedded
    assert not choose_storage(spec(), CREDS).embedded


def test_modes_force_the_choice() -> None:
    assert choose_storage(spec(endpoint="http://x:1"), CREDS, StorageMode.embedded, lambda _: True).embedded
    with pytest.raises(ValueError, match="not reachable"):
        choose_storage(spec(endpoint="http://x:1"), CREDS, StorageMode.manifest, lambda _: False)


def test_endpoint_probe_against_a_real_socket() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert endpoint_reachable(f"http://127.0.0.1:{port}")
    assert not endpoint_reachable(f"http://127.0.0.1:{port}", timeout=0.5)
    assert not endpoint_reachable("http://no-such-host.invalid:8333", timeout=0.5)


def test_bucket_of() -> None:
    assert bucket_of("s3://kuberlhf/pipelines/x") == "kuberlhf"
    with pytest.raises(ValueError):
        bucket_of("file:///tmp")
