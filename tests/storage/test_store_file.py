"""file:// URIs through the same interface: commit protocol, verification, atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from kuberlhf.storage import ChecksumMismatchError, IncompleteCheckpointError, ObjectStore
from storage.trees import read_tree


@pytest.fixture()
def fstore() -> ObjectStore:
    return ObjectStore.from_uri("file:///unused", env={})


def test_file_round_trip_and_idempotent_reupload(fstore: ObjectStore, small_tree: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/store/ns/p/u/sft"
    manifest = fstore.upload_dir(small_tree, f"{uri}/model", producer="sft")
    assert fstore.is_complete(f"{uri}/model")
    assert (tmp_path / "store/ns/p/u/sft/model/_COMPLETE").is_file()
    assert fstore.read_manifest(f"{uri}/model").sha256 == manifest.sha256
    stamp = (tmp_path / "store/ns/p/u/sft/model/weights/part-0.bin").stat().st_mtime_ns
    assert fstore.upload_dir(small_tree, f"{uri}/model", producer="sft").sha256 == manifest.sha256
    assert (tmp_path / "store/ns/p/u/sft/model/weights/part-0.bin").stat().st_mtime_ns == stamp

    out = tmp_path / "out"
    fstore.download_dir(f"{uri}/model", out)
    assert read_tree(out) == read_tree(small_tree)
    assert not list((tmp_path / "store").rglob("*.kuberlhf-part"))
    # a plain path works too
    fstore.download_dir(str(tmp_path / "store/ns/p/u/sft/model"), tmp_path / "out2")
    assert read_tree(tmp_path / "out2") == read_tree(small_tree)


def test_file_incomplete_refused_and_corruption_named(fstore: ObjectStore, small_tree: Path, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/s/ck"
    fstore.upload_dir(small_tree, uri, producer="sft", commit=False)
    with pytest.raises(IncompleteCheckpointError):
        fstore.download_dir(uri, tmp_path / "o")
    fstore.upload_dir(small_tree, uri, producer="sft")
    target = tmp_path / "s/ck/tokenizer/tokenizer.json"
    data = bytearray(target.read_bytes())
    data[0] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=r"tokenizer/tokenizer\.json"):
        fstore.download_dir(uri, tmp_path / "o")
    # the next upload repairs the corrupt file (size matches but the hash does not)
    fstore.upload_dir(small_tree, uri, producer="sft", extra={"repair": True})
    fstore.download_dir(uri, tmp_path / "o")
    assert read_tree(tmp_path / "o") == read_tree(small_tree)


def test_file_checkpoints_and_delete(fstore: ObjectStore, small_tree: Path, tmp_path: Path) -> None:
    root = f"file://{tmp_path}/ckpt"
    for step in (3, 20, 100):
        fstore.upload_dir(small_tree, f"{root}/step-{step}", producer="ppo")
    fstore.upload_dir(small_tree, f"{root}/step-200", producer="ppo", commit=False)
    assert [s for s, _ in fstore.list_checkpoints(root)] == [3, 20, 100]
    fstore.delete_prefix(f"{root}/step-20")
    assert [s for s, _ in fstore.list_checkpoints(root)] == [3, 100]
    assert not (tmp_path / "ckpt/step-20").exists()
    fstore.put_bytes(f"{root}/metrics.jsonl", b"{}\n")
    assert fstore.get_bytes(f"{root}/metrics.jsonl") == b"{}\n"
    assert fstore.list_checkpoints(f"file://{tmp_path}/none") == []
