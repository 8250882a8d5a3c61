"""The background checkpoint upload (``kuberlhf.stages.runtime.PendingUpload``) against the real file:// object
store: files are uploaded off the training thread without committing; an upload error reaches the trainer at
``wait()``; a rank that uploads nothing has nothing to wait for. (The stage paths that commit it -- a two-node
checkpoint, crash and resume -- run in ``tests/trainer/test_multinode.py`` with the upload in the background.)"""

from __future__ import annotations

import pytest

from kuberlhf.stages.runtime import PendingUpload
from kuberlhf.storage import ObjectStore, StorageError


def test_upload_runs_off_the_thread_and_commits_nothing(tmp_path):
    local = tmp_path / "step-3"
    (local / "model").mkdir(parents=True)
    (local / "model" / "shard.bin").write_bytes(b"x" * 4096)
    (local / "trainer_state_rank0.pt").write_bytes(b"state")
    uri = (tmp_path / "bucket" / "ckpt" / "step-3").as_uri()
    store = ObjectStore.from_uri(uri)
    pending = PendingUpload.start(store, local, uri, 3, uploads=True)
    assert pending.thread is not None and pending.thread.name == "upload-step-3"
    entries = pending.wait()
    assert pending.done() and sorted(e.path for e in entries) == ["model/shard.bin", "trainer_state_rank0.pt"]
    assert not store.is_complete(uri)  # _COMPLETE is the stage's commit, after every node's upload
    store.commit(uri, entries, producer="test")
    assert store.is_complete(uri)


def test_an_upload_error_is_raised_in_the_waiting_thread(tmp_path):
    uri = (tmp_path / "bucket" / "ckpt" / "step-1").as_uri()
    pending = PendingUpload.start(ObjectStore.from_uri(uri), tmp_path / "missing", uri, 1, uploads=True)
    with pytest.raises(StorageError, match="does not exist"):  # what the store raised, unchanged
        pending.wait()
    idle = PendingUpload.start(ObjectStore.from_uri(uri), tmp_path / "missing", uri, 1, uploads=False)
    assert idle.done() and idle.wait() == []
