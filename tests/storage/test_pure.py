"""Unit tests of the pure parts: URIs, manifests, local scans."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from kuberlhf.storage import StorageError, join_uri, parse_uri
from kuberlhf.storage.manifest import (
    FileEntry,
    build_manifest,
    complete_marker_body,
    list_local_files,
    marker_manifest_sha,
    parse_manifest,
    scan_dir,
    validate_rel_path,
)


def test_parse_s3_uri() -> None:
    u = parse_uri("s3://bucket/a/b/")
    assert (u.scheme, u.bucket, u.key, u.prefix) == ("s3", "bucket", "a/b", "a/b/")
    assert str(u.child("step-1")) == "s3://bucket/a/b/step-1"
    root = parse_uri("s3://bucket")
    assert (root.key, root.prefix, str(root.child("x"))) == ("", "", "s3://bucket/x")


def test_parse_file_uri_and_plain_path(tmp_path: Path) -> None:
    assert parse_uri(f"file://{tmp_path}/x/").key == f"{tmp_path}/x"
    assert parse_uri(str(tmp_path)).key == str(tmp_path)
    assert str(parse_uri(f"file://{tmp_path}")) == f"file://{tmp_path}"


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [("s3:///key", "no bucket"), ("gs://b/k", "unsupported"), ("file://host/x", "names host"), ("", "empty")],
)
def test_bad_uris_name_the_fix(uri: str, fragment: str) -> None:
    with pytest.raises(StorageError, match=fragment):
        parse_uri(uri)


def test_join_uri() -> None:
    assert join_uri("s3://b/x/", "/model/", "config.json") == "s3://b/x/model/config.json"


def test_manifest_round_trip_and_digest() -> None:
    entries = [FileEntry(path="b", size=1, sha256="0" * 64), FileEntry(path="a/x", size=0, sha256="f" * 64)]
    m = build_manifest(entries, producer="sft", extra={"configSha256": "abc"})
    assert [e.path for e in m.files] == ["a/x", "b"]
    assert m.total_bytes == 1
    data = m.to_json_bytes()
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    back = parse_manifest(data, source="test")
    assert back.sha256 == m.sha256 and back.same_content(m)
    assert marker_manifest_sha(complete_marker_body(m)) == m.sha256
    assert marker_manifest_sha(b"") is None


def test_manifest_rejects_duplicates_and_unclean_paths() -> None:
    e = FileEntry(path="a", size=0, sha256="0" * 64)
    with pytest.raises(StorageError, match="appears twice"):
        build_manifest([e, e], producer="x")
    for bad in ("../x", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(StorageError, match="clean relative path"):
            validate_rel_path(bad)


def test_parse_manifest_names_the_source() -> None:
    with pytest.raises(StorageError, match="s3://b/m.json is not a valid kuberlhf manifest"):
        parse_manifest(b'{"files": 3}', source="s3://b/m.json")


def test_scan_skips_protocol_files_at_top_only(tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "step-1").mkdir(parents=True)
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "_COMPLETE").write_text("")
    (tmp_path / "ckpt" / "step-1" / "_COMPLETE").write_text("")  # nested: an ordinary file of the outer checkpoint
    (tmp_path / "w.bin").write_bytes(b"abc")
    (tmp_path / ".w.bin.123.kuberlhf-part").write_bytes(b"partial")
    assert [rel for rel, _ in list_local_files(tmp_path)] == ["ckpt/step-1/_COMPLETE", "w.bin"]
    entries = {e.path: e for e in scan_dir(tmp_path)}
    assert entries["w.bin"].sha256 == hashlib.sha256(b"abc").hexdigest()
    assert entries["w.bin"].size == 3


def test_scan_missing_dir_names_it(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nope"):
        scan_dir(tmp_path / "nope")
