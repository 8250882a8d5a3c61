"""The commit protocol and transfers against the real SeaweedFS S3 server (session fixture)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kuberlhf.contract.spec import StorageSpec
from kuberlhf.storage import (
    BucketNotFoundError,
    ChecksumMismatchError,
    IncompleteCheckpointError,
    ObjectStore,
    StorageAuthError,
    StorageError,
    StorageUnreachableError,
)
from kuberlhf.storage.s3 import SHA256_META, TransferTuning
from kuberlhf.storage.seaweed import free_port
from storage.trees import read_tree, write_tree

MiB = 1 << 20


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bytes to hundreds of MB: one 200 MB file (multipart), mid-size files and many small ones."""
    files: dict[str, bytes | int] = {"zero.bin": b"", "one.bin": b"x", "model/big.safetensors": 200 * MiB}
    files.update({f"model/shard-{i}.bin": (i + 1) * 3 * MiB for i in range(3)})
    files.update({f"tokenizer/small-{i}.json": 100 + i for i in range(40)})
    return write_tree(tmp_path_factory.mktemp("big") / "ckpt", files)


def test_round_trip_bytes_to_hundreds_of_mb(store: ObjectStore, s3_bucket: str, big_tree: Path, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/ns/pipe/uid/sft/model"
    manifest = store.upload_dir(big_tree, uri, producer="sft", extra={"configSha256": "c0ffee"})
    assert store.is_complete(uri)
    assert len(manifest.files) == 46
    assert manifest.total_bytes == sum(p.stat().st_size for p in big_tree.rglob("*") if p.is_file())
    assert store.read_manifest(uri).sha256 == manifest.sha256
    # _COMPLETE names the manifest it was written for
    assert manifest.sha256 in store.get_bytes(f"{uri}/_COMPLETE").decode()

    out = tmp_path / "out"
    got = store.download_dir(uri, out)
    assert got.sha256 == manifest.sha256
    assert read_tree(out) == read_tree(big_tree)
    assert not list(out.rglob("*.kuberlhf-part"))


def test_prefix_without_complete_is_refused(
    store: ObjectStore, s3_bucket: str, small_tree: Path, tmp_path: Path
) -> None:
    uri = f"{s3_bucket}/half"
    store.upload_dir(small_tree, uri, producer="sft", commit=False)
    assert store.exists(f"{uri}/config.json")
    assert not store.is_complete(uri)
    assert store.read_manifest(uri) is None
    with pytest.raises(IncompleteCheckpointError, match=r"half is not a complete checkpoint \(no _COMPLETE"):
        store.download_dir(uri, tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


def test_flipped_byte_is_detected_and_named(
    store: ObjectStore, s3_server, s3_bucket: str, small_tree: Path, tmp_path: Path
) -> None:
    uri = f"{s3_bucket}/flip"
    store.upload_dir(small_tree, uri, producer="reward")
    bucket, key = s3_bucket.removeprefix("s3://"), "flip/weights/part-0.bin"
    client = s3_server.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01  # same size, one bit different: only the sha256 can tell
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    out = tmp_path / "out"
    with pytest.raises(ChecksumMismatchError, match=r"weights/part-0\.bin") as err:
        store.download_dir(uri, out)
    assert err.value.path == "weights/part-0.bin"
    assert not (out / "weights" / "part-0.bin").exists()  # never left where a loader would find it
    assert not list(out.rglob("*.kuberlhf-part"))


def test_tampered_manifest_is_detected(store: ObjectStore, s3_bucket: str, small_tree: Path, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/tamper"
    store.upload_dir(small_tree, uri, producer="sft")
    text = store.get_bytes(f"{uri}/manifest.json").replace(b'"sft"', b'"ppo"')
    store.put_bytes(f"{uri}/manifest.json", text)
    with pytest.raises(ChecksumMismatchError, match="manifest.json"):
        store.download_dir(uri, tmp_path / "out")


def test_second_upload_is_skipped_and_changes_are_uploaded(
    store: ObjectStore, s3_server, s3_bucket: str, small_tree: Path, tmp_path: Path
) -> None:
    uri = f"{s3_bucket}/idem"
    first = store.upload_dir(small_tree, uri, producer="sft")
    bucket = s3_bucket.removeprefix("s3://")
    client = s3_server.client()
    stamps = {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    again = store.upload_dir(small_tree, uri, producer="sft")
    assert again.sha256 == first.sha256
    assert {o["Key"]: o["LastModified"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]} == stamps

    (small_tree / "config.json").write_text('{"model_type": "opt", "v": 2}')
    changed = store.upload_dir(small_tree, uri, producer="sft")
    assert changed.sha256 != first.sha256
    head = client.head_object(Bucket=bucket, Key="idem/config.json")
    assert head["Metadata"][SHA256_META] == changed.by_path()["config.json"].sha256
    # unchanged big file was not re-sent (resume by size + stamped sha256)
    assert (
        client.head_object(Bucket=bucket, Key="idem/weights/part-0.bin")["LastModified"]
        == stamps["idem/weights/part-0.bin"]
    )
    store.download_dir(uri, tmp_path / "o")
    assert (tmp_path / "o" / "config.json").read_text().endswith('"v": 2}')


def test_download_resumes_and_repairs(store: ObjectStore, s3_bucket: str, small_tree: Path, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/resume"
    store.upload_dir(small_tree, uri, producer="sft")
    out = tmp_path / "out"
    store.download_dir(uri, out)
    kept = out / "weights" / "part-0.bin"
    kept_mtime = kept.stat().st_mtime_ns
    (out / "config.json").write_text("corrupted locally")
    (out / "tokenizer" / "tokenizer.json").unlink()
    store.download_dir(uri, out)
    assert read_tree(out) == read_tree(small_tree)
    assert kept.stat().st_mtime_ns == kept_mtime  # verified, not fetched again


def test_list_checkpoints_complete_only_ascending(store: ObjectStore, s3_bucket: str, small_tree: Path) -> None:
    root = f"{s3_bucket}/ns/p/u/ppo/ckpt"
    for step in (10, 2, 1):
        store.upload_dir(small_tree, f"{root}/step-{step}", producer="ppo", extra={"step": step})
    store.upload_dir(small_tree, f"{root}/step-30", producer="ppo", commit=False)  # crashed writer
    store.put_bytes(f"{root}/notes/_COMPLETE", b"")  # not a step-N prefix
    assert store.list_checkpoints(root) == [(1, f"{root}/step-1"), (2, f"{root}/step-2"), (10, f"{root}/step-10")]
    assert store.list_checkpoints(f"{s3_bucket}/nothing/here") == []

    store.delete_prefix(f"{root}/step-1")  # must not touch step-10 (prefix boundary)
    assert [s for s, _ in store.list_checkpoints(root)] == [2, 10]
    assert not store.exists(f"{root}/step-1/config.json")
    assert store.exists(f"{root}/step-10/config.json")


def test_multi_node_upload_then_commit(store: ObjectStore, s3_bucket: str, tmp_path: Path) -> None:
    uri = f"{s3_bucket}/multi"
    node0 = write_tree(tmp_path / "n0", {"rank0/state.pt": 1000, "config.json": b"{}"})
    node1 = write_tree(tmp_path / "n1", {"rank1/state.pt": 2000})
    e0 = store.upload_files(node0, uri)
    e1 = store.upload_files(node1, uri)
    assert not store.is_complete(uri)
    with pytest.raises(StorageError, match="rank2/state.pt.*was not uploaded"):
        store.commit(uri, e0 + e1 + [e1[0].model_copy(update={"path": "rank2/state.pt"})], producer="ppo")
    manifest = store.commit(uri, e0 + e1, producer="ppo")
    assert [e.path for e in manifest.files] == ["config.json", "rank0/state.pt", "rank1/state.pt"]
    store.download_dir(uri, tmp_path / "out")
    assert read_tree(tmp_path / "out") == {**read_tree(node0), **read_tree(node1)}


def test_small_objects_and_from_spec(s3_env, s3_bucket: str) -> None:
    spec = StorageSpec(uri=f"{s3_bucket}/x", endpoint=s3_env.endpoint, path_style=True)
    store = ObjectStore.from_spec(spec)
    store.put_bytes(f"{s3_bucket}/x/metrics.jsonl", b'{"step": 1}\n')
    assert store.get_bytes(f"{s3_bucket}/x/metrics.jsonl") == b'{"step": 1}\n'
    assert store.exists(f"{s3_bucket}/x/metrics.jsonl")
    assert not store.exists(f"{s3_bucket}/x/nope")
    with pytest.raises(StorageError, match="does not exist"):
        store.get_bytes(f"{s3_bucket}/x/nope")


def test_wrong_credentials_clear_error_without_secret(s3_server, s3_bucket: str, small_tree: Path, caplog) -> None:
    wrong_secret = "this-is-not-the-secret-key-123"
    store = ObjectStore.from_uri(
        s3_bucket,
        endpoint=s3_server.endpoint,
        env={"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": wrong_secret},
    )
    caplog.set_level(logging.DEBUG, logger="kuberlhf")
    with pytest.raises(StorageAuthError) as err:
        store.upload_dir(small_tree, f"{s3_bucket}/auth", producer="sft")
    msg = str(err.value)
    assert "AWS_ACCESS_KEY_ID" in msg and "AWS_SECRET_ACCESS_KEY" in msg and "secretRef" in msg
    assert s3_server.endpoint in msg
    assert wrong_secret not in msg and s3_server.secret_key not in msg
    assert wrong_secret not in caplog.text

    unknown = ObjectStore.from_uri(
        s3_bucket, endpoint=s3_server.endpoint, env={"AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "x" * 20}
    )
    with pytest.raises(StorageAuthError, match="rejected the credentials"):
        unknown.is_complete(f"{s3_bucket}/auth")


def test_missing_credentials_clear_error(s3_server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = ObjectStore.from_uri(s3_bucket, endpoint=s3_server.endpoint, env={})
    with pytest.raises(StorageAuthError, match="no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        store.is_complete(f"{s3_bucket}/x")


def test_unreachable_endpoint_names_it(small_tree: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    store = ObjectStore.from_uri(
        "s3://b/x",
        endpoint=endpoint,
        env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b" * 20},
        tuning=TransferTuning(max_attempts=2),
    )
    with pytest.raises(StorageUnreachableError, match="spec.storage.endpoint") as err:
        store.upload_dir(small_tree, "s3://b/x", producer="sft")
    assert endpoint in str(err.value)


def test_missing_bucket_is_named(s3_env, small_tree: Path, tmp_path: Path) -> None:
    store = ObjectStore.from_uri("s3://x", endpoint=s3_env.endpoint)
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket-here' does not exist"):
        store.upload_dir(small_tree, "s3://no-such-bucket-here/x", producer="sft")
    with pytest.raises(BucketNotFoundError, match="no-such-bucket-here"):
        store.download_dir("s3://no-such-bucket-here/x", tmp_path)


def test_secret_never_goes_into_a_manifest(store: ObjectStore, s3_env, s3_bucket: str, small_tree: Path) -> None:
    with pytest.raises(StorageError, match="credentials never go into manifests"):
        store.upload_dir(small_tree, f"{s3_bucket}/leak", producer="sft", extra={"oops": s3_env.secret_key})
    assert not store.is_complete(f"{s3_bucket}/leak")
