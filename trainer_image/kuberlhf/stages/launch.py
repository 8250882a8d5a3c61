"""Starting a stage: ``kuberlhf stage NAME`` on every node (pod).

- Already a worker (RANK / LOCAL_RANK in the env, as under torchrun or the DeepSpeed launcher, or
  ``--local_rank`` given): run the stage in this process.
- World size 1: run in this process, no launcher.
- Otherwise: spawn NPROC_PER_NODE workers with torch's elastic launcher (static rendezvous on
  MASTER_ADDR:MASTER_PORT, this node = NODE_RANK of NNODES), each running ``python -m kuberlhf.stages.worker``.

Bad settings are reported before any worker starts (the DeepSpeed config is checked here).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from kuberlhf.contract.spec import Stage
from kuberlhf.contract.stage import (
    DEFAULT_STOP_GRACE_SECONDS,
    ENV_STOP_GRACE_SECONDS,
    EXIT_INTERRUPTED,
    EXIT_STORAGE_UNAVAILABLE,
    EXIT_USER_ERROR,
    StageContext,
)
from kuberlhf.stages.errors import StageFailed, StageInterrupted


def is_worker(env: Mapping[str, str], local_rank: int | None = None) -> bool:
    return local_rank is not None or "LOCAL_RANK" in env or "RANK" in env


def worker_args(stage: str, pipeline: str | None, resume: bool) -> list[str]:
    args = ["-m", "kuberlhf.stages.worker", stage]
    if pipeline:
        args += ["--pipeline", pipeline]
    if not resume:
        args.append("--no-resume")
    return args


def preflight(ctx: StageContext) -> None:
    """Fail fast on settings no worker could run (raises PreflightError naming every field): the same checks as
    the operator's reconcile, plus that local paths exist in this pod."""
    from kuberlhf.contract.preflight import check_spec

    check_spec(ctx.pipeline.spec, local=True)


def stop_grace_seconds(env: Mapping[str, str]) -> int:
    """How long the stage may take to checkpoint after SIGTERM (the pod's terminationGracePeriodSeconds)."""
    raw = env.get(ENV_STOP_GRACE_SECONDS) or ""
    return int(raw) if raw.isdigit() else DEFAULT_STOP_GRACE_SECONDS


def workers_exit_code(codes: list[int]) -> int:
    """This node's exit code from its failed workers' codes: a user error anywhere wins (retrying cannot fix
    it), then an unavailable store, then an interruption when that is all there was; else a plain failure."""
    if EXIT_USER_ERROR in codes:
        return EXIT_USER_ERROR
    if EXIT_STORAGE_UNAVAILABLE in codes:
        return EXIT_STORAGE_UNAVAILABLE
    if codes and all(c in (EXIT_INTERRUPTED, -15) for c in codes):
        return EXIT_INTERRUPTED
    return 1


def spawn_workers(ctx: StageContext, pipeline: str | None, resume: bool) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=ctx.nnodes, max_nodes=ctx.nnodes, nproc_per_node=ctx.nproc_per_node,
        run_id=f"{ctx.pipeline.metadata.name}-{ctx.stage.value}-{ctx.attempt}",
        rdzv_backend="static", rdzv_endpoint=f"{ctx.master_addr}:{ctx.master_port}",
        rdzv_configs={"rank": ctx.node_rank, "timeout": 900},
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
        # on SIGTERM the launcher forwards it to the workers, which finish their step and commit a checkpoint;
        # they are killed only after this long (the kubelet's own deadline is the pod's grace period)
        shutdown_timeout=stop_grace_seconds(os.environ),
    )
    try:
        elastic_launch(config, sys.executable)(*worker_args(ctx.stage.value, pipeline, resume))
    except SignalException as e:
        raise StageInterrupted(f"stage {ctx.stage.value} on node {ctx.node_rank} stopped by {e.sigval.name}; "
                               "it resumes from its last committed checkpoint") from None
    except ChildFailedError as e:
        codes = sorted({f.exitcode for f in e.failures.values()})
        raise StageFailed(f"stage {ctx.stage.value} failed on node {ctx.node_rank} (worker exit codes {codes})",
                          workers_exit_code(codes)) from None


def run_in_process(stage: str, pipeline: str | None, resume: bool) -> None:
    import transformers

    from kuberlhf.stages.runtime import StageRun

    # the stage shows its own tqdm; transformers' per-load/per-save bars would interleave with it in pod logs
    transformers.utils.logging.disable_progress_bar()
    ctx = StageContext.from_env(stage, pipeline=pipeline)
    run = StageRun(ctx, resume=resume)
    try:
        if ctx.stage is Stage.sft:
            from kuberlhf.stages.sft import run_sft

            run_sft(run)
        elif ctx.stage is Stage.reward:
            from kuberlhf.stages.reward import run_reward

            run_reward(run)
        elif ctx.stage is Stage.dpo:
            from kuberlhf.stages.dpo import run_dpo

            run_dpo(run)
        elif ctx.stage is Stage.grpo:
            from kuberlhf.stages.grpo import run_grpo

            run_grpo(run)
        else:
            from kuberlhf.stages.ppo import run_ppo

            run_ppo(run)
    finally:
        run.close()


def launch(stage: str, pipeline: str | None = None, resume: bool = True, local_rank: int | None = None) -> None:
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))  # the DeepSpeed launcher's --local_rank
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/kuberlhf/torch_extensions"))
    if is_worker(os.environ):
        run_in_process(stage, pipeline, resume)
        return
    ctx = StageContext.from_env(stage, pipeline=pipeline)
    preflight(ctx)
    if ctx.world_size == 1:
        run_in_process(stage, pipeline, resume)
    else:
        spawn_workers(ctx, pipeline, resume)
