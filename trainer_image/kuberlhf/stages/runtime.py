"""What every stage does around its training loop: distributed start, object-store I/O per the contract
layout (inputs, periodic checkpoints, resume, final model + metrics + manifest + ``_COMPLETE``), the local
work directory, metrics and progress.

Outputs in ``<stage>/``: the model dirs (each committed with its own manifest), ``tensorboard/`` (the event files,
committed the same way, when the stage spec has ``tensorboard: true``; tags ``<stage>/<split>/<key>``),
metrics.jsonl, then the stage's manifest.json and ``_COMPLETE``.

Multi-node writes: every node saves its own ranks' checkpoint files into a node-local directory and uploads
them; after a barrier rank 0 merges every node's file list and commits (manifest.json, then ``_COMPLETE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from kuberlhf.contract.stage import METRICS_FILE, TENSORBOARD_DIR, StageContext, manifest_summary
from kuberlhf.training import distributed as D
from kuberlhf.training.metrics import MetricsWriter


class StageInputError(RuntimeError):
    """An input the stage needs is missing in the object store (e.g. step 1 has not completed)."""


def work_root() -> Path:
    return Path(os.environ.get("KUBERLHF_CACHE", Path.home() / ".cache" / "kuberlhf")) / "work"


class StageRun:
    """One process (rank) of a stage."""

    def __init__(self, ctx: StageContext, resume: bool = True):
        from kuberlhf.storage import ObjectStore

        self.ctx = ctx
        self.spec = ctx.pipeline.spec
        self.stage = ctx.stage.value
        self.stage_spec = self.spec.stages.get(self.stage)
        self.resume = resume
        self.dist = D.init_distributed(self.spec.accelerator.value)
        self.layout = ctx.layout
        self.store = ObjectStore.from_spec(self.spec.storage)
        key = hashlib.sha256(self.layout.stage_uri(self.stage).encode()).hexdigest()[:12]
        # node-local scratch, shared by the ranks of this node (and distinct per node even on one machine)
        self.workdir = work_root() / f"{ctx.pipeline.metadata.name}-{self.stage}-{key}" / f"node{self.dist.node_rank}"
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
        from kuberlhf.storage import IncompleteCheckpointError, StorageError

        dest = self.workdir / "inputs" / name
        error: str | None = None
        if self.dist.is_local_main:
            try:
                if not self.store.is_complete(uri):
                    raise IncompleteCheckpointError(uri)
                self.store.download_dir(uri, str(dest))
            except IncompleteCheckpointError:
                error = (f"{what} is missing: {uri} has no _COMPLETE marker. Run the earlier stage first "
                         f"(kuberlhf stage {name.split('-')[0]}) or check spec.storage.uri")
            except StorageError as e:
                error = f"cannot download {what} from {uri}: {e}"
        errors = [e for e in D.all_gather_object(error) if e]
        if errors:
            raise StageInputError(errors[0])
        return dest

    def model_source(self, source: str, field: str, name: str) -> str:
        """A model reference usable by ``kuberlhf.models``: URIs are downloaded first."""
        if source.startswith(("s3://", "file://")):
            return str(self.fetch(source, name, f"the model of {field}"))
        return source

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

    def upload_checkpoint(self, step: int) -> None:
        """Collective, after every rank wrote into ``ckpt_local(step)``: upload and commit ``ckpt/step-N/``."""
        local = self.ckpt_local(step)
        if self.dist.is_main and self.metrics.path.exists():
            shutil.copyfile(self.metrics.path, local / METRICS_FILE)
        D.barrier()
        uri = self.layout.ckpt_uri(self.stage, step)
        entries = self.store.upload_files(str(local), uri) if self.dist.is_local_main else []
        gathered = D.all_gather_object(list(entries))
        if self.dist.is_main:
            merged = {e.path: e for node in gathered for e in node}
            self.store.commit(uri, list(merged.values()), producer=self.producer, extra={"step": step})
        D.barrier()
        # keep only the newest local checkpoint: the object store has the rest
        if self.dist.is_local_main:
            for old in (self.workdir / "ckpt").glob("step-*"):
                if old != local:
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
            self.store.commit(stage_uri, entries, producer=self.producer, extra=extra)
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
