"""Crash consistency: the S3 server is SIGKILLed while an upload runs, then restarted (own server, not the
session one, so other tests are not disturbed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kuberlhf.storage import IncompleteCheckpointError, ObjectStore, StorageError
from kuberlhf.storage.s3 import S3Backend, TransferTuning
from kuberlhf.storage.seaweed import SeaweedServer
from storage.trees import read_tree, write_tree

MiB = 1 << 20


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[SeaweedServer]:
    with SeaweedServer(tmp_path / "sw") as srv:
        srv.create_bucket("crash")
        yield srv
        # after a crash-restart weed sometimes hangs in its graceful shutdown until stop()'s SIGKILL (8 s);
        # this server's data is thrown away anyway
        srv.kill()


def _store(server: SeaweedServer, attempts: int = 8) -> ObjectStore:
    return ObjectStore.from_uri(
        "s3://crash",
        endpoint=server.endpoint,
        env=server.credentials_env(),
        tuning=TransferTuning(max_attempts=attempts),
    )


def test_kill_during_upload_then_retry_completes(server: SeaweedServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    uri = "s3://crash/ns/p/u/sft/model"
    v1 = write_tree(tmp_path / "v1", {"config.json": b'{"v": 1}', "w.bin": 1000})
    v2 = write_tree(
        tmp_path / "v2",
        {"config.json": b'{"v": 2}', "w.bin": 2000, **{f"big-{i}.bin": 40 * MiB for i in range(3)}},
    )
    store = _store(server)
    store.upload_dir(v1, uri, producer="sft")
    assert store.is_complete(uri)

    # Upload v2 over v1; retries are cut to 2 so the killed upload fails instead of waiting for the restart.
    # The kill is placed deterministically inside the transfer: the first half of v2's files is sent for real,
    # then the server dies and the rest is sent to a dead server (polling for a moment to kill raced with an
    # upload that can finish within one poll on an idle machine).
    failing = _store(server, attempts=2)
    real_upload_files = S3Backend.upload_files
    killed: list[bool] = []

    def upload_files_then_crash(self: S3Backend, items: list) -> None:
        if killed or len(items) < 2:
            return real_upload_files(self, items)
        half = len(items) // 2
        real_upload_files(self, items[:half])
        assert not store.is_complete(uri), "v1 must be un-committed before v2's files are sent"
        server.kill()
        killed.append(True)
        real_upload_files(self, items[half:])

    monkeypatch.setattr(S3Backend, "upload_files", upload_files_then_crash)
    with pytest.raises(StorageError):
        failing.upload_dir(v2, uri, producer="sft")
    assert killed, "the upload never reached the transfer of v2's files"
    monkeypatch.setattr(S3Backend, "upload_files", real_upload_files)

    server.start()
    # neither v1 nor half of v2 is readable as complete
    assert not store.is_complete(uri)
    assert store.read_manifest(uri) is None
    with pytest.raises(IncompleteCheckpointError):
        store.download_dir(uri, tmp_path / "half")

    manifest = store.upload_dir(v2, uri, producer="sft")  # the retry
    assert store.is_complete(uri)
    assert manifest.by_path()["config.json"].size == len(b'{"v": 2}')
    store.download_dir(uri, tmp_path / "out")
    assert read_tree(tmp_path / "out") == read_tree(v2)


def test_restart_within_the_retry_window_lets_the_same_call_finish(server: SeaweedServer, tmp_path: Path) -> None:
    """botocore retries with backoff: a short outage does not fail the upload."""
    uri = "s3://crash/blip"
    tree = write_tree(tmp_path / "t", {f"f-{i}.bin": 8 * MiB for i in range(10)})
    store = ObjectStore.from_uri(
        "s3://crash",
        endpoint=server.endpoint,
        env=server.credentials_env(),
        tuning=TransferTuning(max_attempts=10, max_concurrency=2),  # slow enough to be caught mid-way
    )
    outcome: list[BaseException | None] = []

    def upload() -> None:
        try:
            store.upload_dir(tree, uri, producer="sft")
            outcome.append(None)
        except BaseException as e:  # noqa: BLE001
            outcome.append(e)

    thread = threading.Thread(target=upload)
    thread.start()
    probe = server.client()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not probe.list_objects_v2(Bucket="crash", Prefix="blip/").get("KeyCount"):
        time.sleep(0.02)
    assert thread.is_alive(), "the upload finished before the outage; nothing was tested"
    server.kill()
    time.sleep(0.5)
    server.start()
    thread.join(timeout=180)
    assert outcome == [None], f"upload did not survive a short outage: {outcome}"
    store.download_dir(uri, tmp_path / "out")
    assert read_tree(tmp_path / "out") == read_tree(tree)
