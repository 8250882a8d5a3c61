"""What every stage does around its training loop: distributed start, object-store I/O per the contract
layout (inputs, periodic checkpoints, resume, final model + metrics + manifest + ``_COMPLETE``), the local
work directory, metrics and progress.

Outputs in ``<stage>/``: the model dirs (each committed with its own manifest), ``tensorboard/`` (the event files,
committed the same way, when the stage spec has ``tensorboard: true``; tags ``<stage>/<split>/<key>``),
metrics.jsonl, then the stage's manifest.json and ``_COMPLETE``.

Multi-node writes: every node saves its own ranks' checkpoint files into a node-local directory and uploads
them; after a barrier rank 0 merges every node's file list and commits (manifest.json, then ``_COMPLETE``).

Stopping: SIGTERM (preemption, node drain, eviction) only sets a flag; at the next optimizer step every rank agrees
to stop (one all-reduce per step), commits a checkpoint of that step and exits ``EXIT_INTERRUPTED``, so the next
attempt resumes there. Object-store outages are ridden out for ``KUBERLHF_STORAGE_RETRY_SECONDS`` (RetryingStore).
On success rank 0 writes what it committed (stage URI, manifest sha256) to the pod's termination message, which
is how the operator learns it when it may not read the bucket itself (workload identity).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kuberlhf.contract.stage import (
    DEFAULT_STORAGE_RETRY_SECONDS,
    DEFAULT_TERMINATION_LOG,
    ENV_STORAGE_RETRY_SECONDS,
    ENV_TERMINATION_LOG,
    ENV_WORK_DIR,
    METRICS_FILE,
    TENSORBOARD_DIR,
    StageContext,
    manifest_summary,
)
from kuberlhf.stages.errors import StageInterrupted
from kuberlhf.storage.manifest import list_local_files
from kuberlhf.training import distributed as D
from kuberlhf.training.metrics import MetricsWriter


class StageInputError(RuntimeError):
    """An input the stage needs is missing in the object store (e.g. step 1 has not completed)."""


def work_root(env: Mapping[str, str]) -> Path:
    """Root of the node-local scratch: ``KUBERLHF_WORK_DIR`` (the local runner sets one inside its output directory,
    so two runs never share scratch), else ``$KUBERLHF_CACHE/work`` (a pod's own scratch volume)."""
    if env.get(ENV_WORK_DIR):
        return Path(env[ENV_WORK_DIR])
    return Path(env.get("KUBERLHF_CACHE", Path.home() / ".cache" / "kuberlhf")) / "work"


def scratch_dir(root: Path, pipeline: str, stage: str, stage_uri: str, endpoint: str | None, node_rank: int) -> Path:
    """A node's scratch for one stage, shared by its ranks: keyed by the store (endpoint) and the stage's URI in
    it, so two stores that hold the same URI (two runs' embedded servers) never meet in one folder either."""
    key = hashlib.sha256(f"{endpoint or ''}|{stage_uri}".encode()).hexdigest()[:12]
    return root / f"{pipeline}-{stage}-{key}" / f"node{node_rank}"


def storage_retry_seconds(env: Mapping[str, str]) -> float:
    raw = env.get(ENV_STORAGE_RETRY_SECONDS) or ""
    try:
        return max(0.0, float(raw))
    except ValueError:
        return float(DEFAULT_STORAGE_RETRY_SECONDS)


def completion_report(stage: str, uri: str, manifest_sha256: str) -> str:
    """The termination message of a stage pod that committed its output (read by the operator)."""
    return json.dumps({"kuberlhf": {"stage": stage, "checkpoint": uri, "manifestSha256": manifest_sha256}},
                      sort_keys=True)


def write_termination_message(text: str, env: Mapping[str, str]) -> None:
    """Into ENV_TERMINATION_LOG when set, else the kubelet's /dev/termination-log when it exists (the kubelet
    creates it; outside a pod nothing is written, so a root shell never litters /dev)."""
    path = Path(env.get(ENV_TERMINATION_LOG) or DEFAULT_TERMINATION_LOG)
    if ENV_TERMINATION_LOG not in env and not path.exists():
        return
    with contextlib.suppress(OSError):  # not writable: nobody would read it
        path.write_text(text)


# Test hook: rank 0 dies (exit CRASH_EXIT_CODE) while the save of this step's checkpoint is in flight, after its
# files are written and one of them is uploaded: a kill mid-save, leaving a half-uploaded ckpt/step-N/.
CRASH_MID_SAVE_ENV = "KUBERLHF_CRASH_DURING_CHECKPOINT_SAVE"
CRASH_EXIT_CODE = 75


class PendingSave:
    """One checkpoint leaving one rank: its snapshots written to the node's scratch (``write_files``), then this
    rank's files uploaded (each rank uploads its own; the node's local rank 0 also the files written at snapshot
    time: metrics.jsonl, DeepSpeed's ``latest``), in a thread when ``background``. Nothing is committed here:
    :meth:`wait` returns the manifest entries of what was uploaded, or raises what the save raised."""

    def __init__(self, step: int, uri: str) -> None:
        self.step, self.uri = step, uri
        self.entries: list[Any] = []
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self.seconds: dict[str, float] = {}  # write, upload: this rank's, for the log line of the commit

    @classmethod
    def start(cls, store: Any, local: Path, uri: str, step: int, files: list[Any], extra: list[str],
              background: bool, crash: bool = False) -> PendingSave:
        from kuberlhf.training.checkpoint import write_files

        pending = cls(step, uri)
        paths = sorted({*extra, *(f.path.relative_to(local).as_posix() for f in files)})

        def run() -> None:
            try:
                t0 = time.monotonic()
                write_files(files)
                t1 = pending.seconds["write"] = time.monotonic() - t0
                if crash:
                    store.upload_files(str(local), uri, paths=paths[:1])
                    os._exit(CRASH_EXIT_CODE)
                pending.entries = store.upload_files(str(local), uri, paths=paths)
                pending.seconds["upload"] = time.monotonic() - t0 - t1
            except BaseException as e:  # noqa: BLE001 - re-raised by wait() in the training thread
                pending.error = e

        if background:
            pending.thread = threading.Thread(target=run, name=f"save-step-{step}", daemon=True)
            pending.thread.start()
        else:
            run()
        return pending

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def wait(self) -> list[Any]:
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.entries


class StageRun:
    """One process (rank) of a stage."""

    def __init__(self, ctx: StageContext, resume: bool = True):
        from kuberlhf.storage import ObjectStore
        from kuberlhf.storage.retry import RetryingStore

        self.ctx = ctx
        self.spec = ctx.pipeline.spec
        self.stage = ctx.stage.value
        self.stage_spec = self.spec.stages.get(self.stage)
        self.resume = resume
        self.dist = D.init_distributed(self.spec.accelerator.value)
        self.layout = ctx.layout
        self.store = RetryingStore(ObjectStore.from_spec(self.spec.storage), storage_retry_seconds(os.environ))
        self.stop_requested = False
        self._stopping = False  # checkpoint_due decided to stop: the last checkpoint is saved synchronously
        self._pending: PendingSave | None = None  # the checkpoint being saved in the background
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        # node-local scratch, shared by the ranks of this node (and distinct per node even on one machine)
        self.workdir = scratch_dir(work_root(os.environ), ctx.pipeline.metadata.name, self.stage,
                                   self.layout.stage_uri(self.stage), self.spec.storage.endpoint, self.dist.node_rank)
        if self.dist.is_local_main:
            self.workdir.mkdir(parents=True, exist_ok=True)
        D.barrier()
        tb = self.workdir / TENSORBOARD_DIR if self.stage_spec.tensorboard else None
        self.metrics = MetricsWriter(self.workdir / METRICS_FILE, self.stage, enabled=self.dist.is_main,
                                     tensorboard_dir=tb)
        self.metrics.reset()  # a fresh run (or a resume, which restores both from the checkpoint)

    # --- inputs --------------------------------------------------------------------------------------
    def fetch(self, uri: str, name: str, what: str) -> Path:
        """Download a committed prefix into this node's work dir (local rank 0 downloads, the rest wait)."""
        from kuberlhf.storage import IncompleteCheckpointError, StorageError, StorageTransientError

        dest = self.workdir / "inputs" / name
        error: tuple[bool, str] | None = None  # (transient, message)
        if self.dist.is_local_main:
            try:
                if not self.store.is_complete(uri):
                    raise IncompleteCheckpointError(uri)
                self.store.download_dir(uri, str(dest))
            except IncompleteCheckpointError:
                error = (False, f"{what} is missing: {uri} has no _COMPLETE marker. Run the earlier stage first "
                                f"(kuberlhf stage {name.split('-')[0]}) or check spec.storage.uri")
            except StorageError as e:
                error = (isinstance(e, StorageTransientError), f"cannot download {what} from {uri}: {e}")
        errors = [e for e in D.all_gather_object(error) if e]
        if errors:
            transient, message = errors[0]
            raise (StorageTransientError if transient else StageInputError)(message)
        return dest

    def model_source(self, source: str, field: str, name: str) -> str:
        """A model reference usable by ``kuberlhf.models``: URIs are downloaded first."""
        if source.startswith(("s3://", "file://")):
            return str(self.fetch(source, name, f"the model of {field}"))
        return source

    # --- stopping on SIGTERM -----------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if not self.stop_requested:
            os.write(sys.stderr.fileno(), f"{self.stage}: SIGTERM: committing a checkpoint after this step, then "
                                          "stopping\n".encode())
        self.stop_requested = True

    def checkpoint_due(self, step: int, total: int, every: int | None) -> tuple[bool, bool]:
        """Collective, after optimizer step ``step`` of ``total``: (save a checkpoint now, stop after saving).
        Periodic checkpoints every ``every`` steps; a stop when any rank got SIGTERM (the last step just
        finishes the stage instead)."""
        stop = D.any_rank(self.stop_requested) and step < total
        periodic = bool(every) and step % every == 0 and step < total
        self._stopping = stop
        if self._pending is not None and not D.any_rank(not self._pending.done()):
            self.drain_upload()  # every node's files are up: commit now, not at the next checkpoint
        return periodic or stop, stop

    def interrupted(self, step: int) -> StageInterrupted:
        """The exception that ends a stage stopped by SIGTERM once checkpoint ``step`` is committed."""
        return StageInterrupted(f"stage {self.stage} stopped by SIGTERM after committing checkpoint step {step} "
                                f"({self.layout.ckpt_uri(self.stage, step)}); the next attempt resumes there")

    # --- checkpoints -------------------------------------------------------------------------------------
    def ckpt_local(self, step: int) -> Path:
        return self.workdir / "ckpt" / f"step-{step}"

    def latest_checkpoint(self) -> int | None:
        if not self.resume:
            return None
        found = None
        if self.dist.is_main:
            ckpts = self.store.list_checkpoints(self.layout.ckpt_root(self.stage))
            found = ckpts[-1][0] if ckpts else None
        return D.broadcast_object(found)

    def download_checkpoint(self, step: int) -> Path:
        local = self.ckpt_local(step)
        uri = self.layout.ckpt_uri(self.stage, step)
        if self.dist.is_main:
            print(f"resuming {self.stage} from {uri}", flush=True)  # the pod log says where a retry started
        if self.dist.is_local_main:
            self.store.download_dir(uri, str(local))
        D.barrier()
        if self.dist.is_main and (local / METRICS_FILE).exists():
            shutil.copyfile(local / METRICS_FILE, self.metrics.path)
            self.metrics.truncate_after(step)
        return local

    def save_checkpoint(self, step: int, snapshot: Callable[[Path], list[Any]]) -> None:
        """Collective, after optimizer step ``step``: save and commit ``ckpt/step-N/``. ``snapshot(local dir)``
        (collective) returns this rank's files as host-memory snapshots (``kuberlhf.training.checkpoint``).

        With the stage's ``backgroundCheckpointUpload`` (not when stopping) only the snapshot is taken on the
        training thread: writing and uploading run in a thread of each rank while training goes on, and
        ``_COMPLETE`` is committed once every rank's files are up (checked at each step by :meth:`checkpoint_due`),
        at the latest before the next checkpoint or the stage's outputs. Until then the previous checkpoint is the
        one a restart resumes from. One save is in flight at most: when the next checkpoint is due first, training
        waits for the previous one to be committed before taking the next snapshot (said once on stderr)."""
        if self._pending is not None:
            t0 = time.monotonic()
            previous = self._pending.step
            self.drain_upload()
            if self.dist.is_main:
                print(f"{self.stage}: checkpoint step {previous} was still being saved when step {step} was due: "
                      f"training waited {time.monotonic() - t0:.1f}s for it (one save in flight at most; a larger "
                      "checkpointEverySteps avoids the wait)", file=sys.stderr, flush=True)
        local = self.ckpt_local(step)
        if self.dist.is_local_main:  # left over from an attempt that died saving this step: never mixed in
            shutil.rmtree(local, ignore_errors=True)
        D.barrier()
        t0 = time.monotonic()
        files = snapshot(local)
        copied = time.monotonic() - t0
        if self.dist.is_main and self.metrics.path.exists():
            shutil.copyfile(self.metrics.path, local / METRICS_FILE)
        D.barrier()  # every small file is in place and no snapshot has been written yet
        extra = [rel for rel, _ in list_local_files(local)] if self.dist.is_local_main else []
        uri = self.layout.ckpt_uri(self.stage, step)
        background = getattr(self.stage_spec, "background_checkpoint_upload", False) and not self._stopping
        crash = os.environ.get(CRASH_MID_SAVE_ENV) == str(step) and self.dist.is_main
        pending = PendingSave.start(self.store, local, uri, step, files, extra, background, crash)
        pending.seconds["copy"] = copied
        self._pending = pending
        if not background:
            self.drain_upload()

    def drain_upload(self) -> None:
        """Collective: wait for the background save (if any) and commit it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._commit_checkpoint(pending)

    def _commit_checkpoint(self, pending: PendingSave) -> None:
        step, seconds = pending.step, pending.seconds
        gathered = D.all_gather_object(list(pending.wait()))
        if self.dist.is_main:
            merged = {e.path: e for node in gathered for e in node}
            manifest = self.store.commit(pending.uri, list(merged.values()), producer=self.producer,
                                         extra={"step": step})
            where = "on the training thread" if pending.thread is None else "in the background"
            print(f"{self.stage}: committed checkpoint step {step} ({manifest.total_bytes / 2**20:.0f} MiB): state "
                  f"copied in {seconds.get('copy', 0):.2f}s, written in {seconds.get('write', 0):.2f}s and uploaded "
                  f"in {seconds.get('upload', 0):.2f}s {where} (rank 0)", file=sys.stderr, flush=True)
        D.barrier()
        # keep only the newest local checkpoints: the object store has the older ones
        if self.dist.is_local_main:
            for old in (self.workdir / "ckpt").glob("step-*"):
                if int(old.name.split("-")[1]) < step:
                    shutil.rmtree(old, ignore_errors=True)

    # --- outputs -------------------------------------------------------------------------------------
    @property
    def producer(self) -> str:
        return f"kuberlhf-stage-{self.stage}"

    def output_dir(self, name: str) -> Path:
        return self.workdir / "out" / name

    def finish(self, model_dirs: dict[str, Path], summary: dict[str, Any] | None = None) -> None:
        """Collective. Rank 0 uploads the model dirs (each committed), metrics.jsonl, then the stage manifest
        and ``_COMPLETE`` last; optionally copies everything to KUBERLHF_LOCAL_OUTPUT."""
        self.drain_upload()
        D.barrier()
        if self.dist.is_main:
            self.metrics.close()
            stage_uri = self.layout.stage_uri(self.stage)
            extra = {**manifest_summary(self.ctx.pipeline), "stage": self.stage, "attempt": self.ctx.attempt,
                     **(summary or {})}
            dirs = dict(model_dirs)
            if self.metrics.tensorboard_dir is not None and self.metrics.tensorboard_dir.exists():
                dirs[TENSORBOARD_DIR] = self.metrics.tensorboard_dir
            entries = []
            for name, local in dirs.items():
                manifest = self.store.upload_dir(str(local), f"{stage_uri}/{name}", producer=self.producer,
                                                 extra=extra)
                entries += [e.model_copy(update={"path": f"{name}/{e.path}"}) for e in manifest.files]
            if not self.metrics.path.exists():
                self.metrics.path.write_text("")
            metrics_dir = self.workdir / "out" / "_metrics"
            metrics_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.metrics.path, metrics_dir / METRICS_FILE)
            entries += self.store.upload_files(str(metrics_dir), stage_uri)
            manifest = self.store.commit(stage_uri, entries, producer=self.producer, extra=extra)
            write_termination_message(completion_report(self.stage, stage_uri, manifest.sha256), os.environ)
            if self.ctx.local_output:
                out = Path(self.ctx.local_output)
                out.mkdir(parents=True, exist_ok=True)
                for name, local in dirs.items():
                    shutil.copytree(local, out / name, dirs_exist_ok=True)
                shutil.copyfile(self.metrics.path, out / METRICS_FILE)
                (out / "summary.json").write_text(json.dumps(extra, indent=2) + "\n")
        D.barrier()
        # the object store holds everything now; scratch of a finished stage is only clutter
        if self.dist.is_local_main and os.environ.get("KUBERLHF_KEEP_WORKDIR") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        D.destroy()
