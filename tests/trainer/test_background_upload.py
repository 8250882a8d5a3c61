"""The background checkpoint save against the real file:// object store: the training thread only takes a
host-memory snapshot (``kuberlhf.training.checkpoint.snapshot``), which later in-place updates cannot reach; a
thread of each rank writes it (no half-written file ever under its final name) and uploads that rank's files
(``kuberlhf.stages.runtime.PendingSave``) without committing; an error reaches the trainer at ``wait()``. (The stage
paths that commit it -- a two-node checkpoint, crash and resume, a kill mid-save at ZeRO-3 -- run in
``tests/trainer/test_multinode.py`` and ``tests/trainer/test_stages.py``.)"""

from __future__ import annotations

import zipfile

import pytest
import torch

from kuberlhf.stages.runtime import PendingSave
from kuberlhf.storage import ObjectStore, StorageError
from kuberlhf.storage.manifest import PART_SUFFIX
from kuberlhf.training.checkpoint import PendingFile, snapshot, write_files


def live_state() -> dict:
    flat = torch.arange(12, dtype=torch.float32)
    weight = torch.nn.Parameter(flat[:6].view(2, 3))  # views of one flat buffer, as ZeRO's partitions are
    return {
        "module": {"w": weight, "b": flat[6:]},
        "optimizer": {"exp_avg": [torch.ones(3)], "lr": [0.1]},
        "step": 3,
        "flat": flat,
    }


def storages(path) -> list[int]:
    """Byte sizes of the tensor storages a torch.save file holds (its ``data/N`` records)."""
    with zipfile.ZipFile(path) as z:
        return sorted((i.file_size for i in z.infolist() if "/data/" in i.filename), reverse=True)


def test_snapshot_is_the_state_at_that_moment_with_its_storage_sharing(tmp_path):
    state = live_state()
    snap = snapshot(state)
    with torch.no_grad():  # training goes on in place, as the optimizer step does
        state["flat"].add_(100.0)
        state["optimizer"]["exp_avg"][0].mul_(5.0)
    state["optimizer"]["lr"][0] = 9.0
    write_files([PendingFile(tmp_path / "s.pt", snap)])
    back = torch.load(tmp_path / "s.pt", weights_only=False)
    assert torch.equal(back["module"]["w"], torch.arange(6.0).view(2, 3))
    assert torch.equal(back["module"]["b"], torch.arange(6.0, 12.0))
    assert torch.equal(back["optimizer"]["exp_avg"][0], torch.ones(3)) and back["optimizer"]["lr"] == [0.1]
    assert isinstance(back["module"]["w"], torch.nn.Parameter) and back["module"]["w"].requires_grad
    # the views keep one storage, as torch.save of the live state writes it: the same records, shared on load
    live = tmp_path / "live.pt"
    torch.save(live_state(), live)
    assert storages(tmp_path / "s.pt") == storages(live) == [12 * 4, 3 * 4]
    assert back["module"]["w"].untyped_storage().data_ptr() == back["flat"].untyped_storage().data_ptr()
    assert not list(tmp_path.glob(f"*{PART_SUFFIX}"))


def test_save_writes_and_uploads_this_ranks_files_off_the_thread_and_commits_nothing(tmp_path):
    local = tmp_path / "step-3"
    (local / "model").mkdir(parents=True)
    (local / "model" / "latest").write_text("step-3")  # a small file written at snapshot time (local rank 0's)
    (local / "model" / "other_rank.pt").write_bytes(b"another rank's file: not this rank's to upload")
    files = [
        PendingFile(local / "model" / "step-3" / "zero_pp_rank_0_optim_states.pt", snapshot(live_state())),
        PendingFile(local / "trainer_state_rank0.pt", snapshot({"step": 3})),
    ]
    uri = (tmp_path / "bucket" / "ckpt" / "step-3").as_uri()
    store = ObjectStore.from_uri(uri)
    pending = PendingSave.start(store, local, uri, 3, files, ["model/latest"], background=True)
    assert pending.thread is not None and pending.thread.name == "save-step-3"
    entries = pending.wait()
    assert pending.done() and sorted(e.path for e in entries) == [
        "model/latest",
        "model/step-3/zero_pp_rank_0_optim_states.pt",
        "trainer_state_rank0.pt",
    ]
    assert all(f.state is None for f in files)  # the snapshots are released once written
    assert not store.is_complete(uri)  # _COMPLETE is the stage's commit, after every rank's upload
    store.commit(uri, entries, producer="test")
    down = tmp_path / "down"
    store.download_dir(uri, str(down))
    got = torch.load(down / "model" / "step-3" / "zero_pp_rank_0_optim_states.pt", weights_only=False)
    assert torch.equal(got["flat"], torch.arange(12.0))


def test_a_save_error_is_raised_in_the_waiting_thread(tmp_path):
    uri = (tmp_path / "bucket" / "ckpt" / "step-1").as_uri()
    local = tmp_path / "step-1"
    local.mkdir()
    pending = PendingSave.start(ObjectStore.from_uri(uri), local, uri, 1, [], ["gone.pt"], background=True)
    with pytest.raises(StorageError, match="gone.pt"):  # what the store raised, unchanged
        pending.wait()
