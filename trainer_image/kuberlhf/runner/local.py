"""``kuberlhf run``: one RLHFPipeline on this machine, stage after stage, through the stage contract.

Each stage runs as the operator would run its Job (``stage_command`` + ``stage_env``, one process per node),
checkpoints pass through the object store with the commit protocol, and a stage whose ``_COMPLETE`` marker
exists is not run again, so re-running the same command resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kuberlhf.contract.spec import RLHFPipeline, Stage, StorageSpec
from kuberlhf.contract.stage import (
    ENV_S3_ACCESS_KEY,
    ENV_S3_SECRET_KEY,
    ENV_WORK_DIR,
    METRICS_FILE,
    StageLayout,
    nproc_per_node,
    num_nodes,
    stage_command,
    stage_env,
)
from kuberlhf.runner.console import Console, format_duration
from kuberlhf.runner.storage_choice import StorageMode, bucket_of, choose_storage

STAGE_TITLES = {
    Stage.sft: "step 1: supervised fine-tuning (SFT)",
    Stage.reward: "step 2: reward model",
    Stage.ppo: "step 3: PPO (RLHF)",
    Stage.dpo: "step 2: DPO (direct preference optimisation)",
    Stage.grpo: "step 3: GRPO (group-relative policy optimisation)",
}
# what --fresh removes: only what a run writes, never anything else a user keeps in the output directory
RUN_OUTPUTS = (".s3", ".kuberlhf", "logs", "sft", "reward", "ppo", "dpo", "grpo", "plots", "tensorboard", "metrics.jsonl", "run.json",
               "samples.jsonl")

class RunError(RuntimeError):
    """A run that cannot go on; the message says what failed and what to do."""

@dataclass
class RunOptions:
    output_dir: Path
    stages: Sequence[Stage] | None = None  # None: every stage
    fresh: bool = False
    storage_mode: StorageMode = StorageMode.auto
    samples: int = 3
    echo_stage_output: bool = True

@dataclass
class RunResult:
    output_dir: Path
    run_id: str
    stage_times: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None

def run_id_for(pipeline: RLHFPipeline, out: Path) -> str:
    """The uid of a local run: metadata.uid if given, else one per output directory, so re-running into the
    same directory resumes and two directories never share objects in a shared store."""
    if pipeline.metadata.uid:
        return pipeline.metadata.uid
    return "local-" + hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:10]


# fields that do not change what a stage computes (pod resources, retries, logging); the world size does, as
# it sets the global batch
_NOT_RESULT_FIELDS = ("resources", "env", "backoffLimit", "tensorboard", "offload")


def stage_fingerprints(pipeline: RLHFPipeline) -> dict[str, str]:
    """A digest per stage of everything its result depends on, including the stages it reads: a changed PPO
    setting re-runs only PPO; a changed SFT setting re-runs SFT and PPO (which starts from SFT's model), and the
    reward model when it starts from SFT's model too (``stages.reward.initFromSft``)."""
    spec = pipeline.spec.to_wire()

    def digest(*parts: Any) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def stage_part(name: str) -> dict[str, Any]:
        return {k: v for k, v in spec["stages"].get(name, {}).items() if k not in _NOT_RESULT_FIELDS}

    common = (pipeline.metadata.name, spec["data"], spec["accelerator"])
    sft = digest(common, spec["actor"], stage_part("sft"))
    # initFromSft: the reward model starts from SFT's model, so a changed SFT setting re-runs it too
    reward = digest(common, sft if pipeline.spec.reward_from_sft else spec.get("reward"), stage_part("reward"))
    ppo = digest(common, sft, reward, stage_part("ppo"))
    dpo = digest(common, sft, stage_part("dpo"))
    grpo_reads = reward if Stage.reward in pipeline.spec.stage_graph else None
    grpo = digest(common, sft, grpo_reads, stage_part("grpo"))
    every = {Stage.sft: sft, Stage.reward: reward, Stage.ppo: ppo, Stage.dpo: dpo, Stage.grpo: grpo}
    return {st.value: every[st] for st in pipeline.spec.stage_graph}


def with_storage(pipeline: RLHFPipeline, storage: StorageSpec) -> RLHFPipeline:
    """A copy of the pipeline whose stages use ``storage`` (the embedded server's endpoint)."""
    spec = pipeline.spec.model_copy(update={"storage": storage})
    return pipeline.model_copy(update={"spec": spec})

PPO_GRAPH = (Stage.sft, Stage.reward, Stage.ppo)

def stages_to_run(selected: Sequence[Stage] | None, graph: Sequence[Stage] = PPO_GRAPH) -> list[Stage]:
    """The chosen stages of the pipeline's ``graph`` (``PipelineSpec.stage_graph``), in its order."""
    chosen = set(selected) if selected else set(graph)
    outside = [st.value for st in chosen if st not in graph]
    if outside:
        raise RunError(f"this pipeline runs {' -> '.join(st.value for st in graph)}, which has no stage "
                       f"{', '.join(sorted(outside))}")
    return [st for st in graph if st in chosen]

def required_before(stages: Sequence[Stage], graph: Sequence[Stage] = PPO_GRAPH) -> list[Stage]:
    """Stages whose output must already exist: every stage of ``graph`` before the first chosen one."""
    if not stages:
        return []
    return list(graph[:list(graph).index(stages[0])])

def _load_or_make_credentials(path: Path) -> dict[str, str]:
    # stable keys per output directory: a re-run (and a person with the aws CLI) can reach the same store
    if path.exists():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    creds = {ENV_S3_ACCESS_KEY: "kuberlhf-" + secrets.token_hex(6), ENV_S3_SECRET_KEY: secrets.token_urlsafe(24)}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(creds, f)
    return creds

@contextmanager
def object_store_for(pipeline: RLHFPipeline, out: Path, mode: StorageMode,
                     console: Console) -> Iterator[tuple[StorageSpec, dict[str, str]]]:
    """Yield (the storage spec stages get, the credentials env); runs the embedded server while open."""
    storage = pipeline.spec.storage
    choice = choose_storage(storage, os.environ, mode)
    if not choice.embedded:
        console.info(f"object store: {storage.uri}" + (f" at {storage.endpoint}" if storage.endpoint else "")
                     + f" ({choice.reason})")
        creds = {k: os.environ[k] for k in (ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY, "AWS_DEFAULT_REGION",
                                            "AWS_SESSION_TOKEN") if k in os.environ}
        yield storage, creds
        return
    from kuberlhf.storage.seaweed import SeaweedServer

    creds = _load_or_make_credentials(out / ".kuberlhf" / "s3-credentials.json")
    server = SeaweedServer(out / ".s3", access_key=creds[ENV_S3_ACCESS_KEY], secret_key=creds[ENV_S3_SECRET_KEY])
    console.info(f"{choice.reason}: starting an embedded SeaweedFS S3 server for {storage.uri} "
                 f"(data in {out / '.s3'})")
    server.start()
    try:
        uri = storage.uri
        if uri.startswith("s3://"):
            server.create_bucket(bucket_of(uri))
        local = StorageSpec(uri=uri, endpoint=server.endpoint, region=server.region, path_style=True)
        console.info(f"object store: {uri} at {server.endpoint} (embedded; replaces the manifest's endpoint)")
        yield local, server.credentials_env()
    finally:
        server.stop()

def _attempts_file(out: Path) -> Path:
    return out / "run.json"

def _read_state(out: Path) -> dict[str, Any]:
    try:
        return json.loads(_attempts_file(out).read_text())
    except (OSError, json.JSONDecodeError):
        return {}

def _write_state(out: Path, state: Mapping[str, Any]) -> None:
    tmp = _attempts_file(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(_attempts_file(out))

def clean_outputs(out: Path) -> None:
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()

def run_pipeline(pipeline: RLHFPipeline, opts: RunOptions, console: Console | None = None) -> RunResult:
    """Run the chosen stages (default: all) and collect the outputs; raises RunError on failure."""
    from kuberlhf.storage import ObjectStore

    console = console or Console()
    out = opts.output_dir.resolve()
    if opts.fresh:
        clean_outputs(out)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id_for(pipeline, out)
    namespace = pipeline.metadata.namespace or "local"
    graph = pipeline.spec.stage_graph
    stages = stages_to_run(opts.stages, graph)
    result = RunResult(output_dir=out, run_id=run_id)
    t_run = time.monotonic()
    console.header(f"kuberlhf run: pipeline {pipeline.metadata.name!r} (run id {run_id}) -> {out}")

    with object_store_for(pipeline, out, opts.storage_mode, console) as (storage, creds):
        staged = with_storage(pipeline, storage)
        layout = StageLayout.for_pipeline(staged, namespace, run_id)
        store = ObjectStore.from_spec(storage, env={**os.environ, **creds})
        state = _read_state(out)
        state.update({"pipeline": pipeline.metadata.name, "runId": run_id, "namespace": namespace,
                      "storageUri": storage.uri, "endpoint": storage.endpoint, "root": layout.root,
                      "credentialsFile": str(out / ".kuberlhf" / "s3-credentials.json") if creds else None})
        state.setdefault("attempts", {})
        state.setdefault("fingerprints", {})
        _write_state(out, state)
        fingerprints = stage_fingerprints(pipeline)
        for stage in graph:
            # a stage made (or begun) from other settings is stale: its output and checkpoints must not be reused
            recorded = state["fingerprints"].get(stage.value)
            if recorded and recorded != fingerprints[stage.value]:
                if stage in required_before(stages, graph):
                    raise RunError(f"the output of {STAGE_TITLES[stage]} in {layout.stage_uri(stage)} was made from "
                                   f"other settings than this manifest's: run that step again (e.g. `--step 1 2 3`)")
                if stage not in stages:
                    continue  # a later stage that this run does not touch
                console.warn(f"the settings of {stage.value} (or of a stage it reads) changed since its output was "
                             f"made: discarding {layout.stage_uri(stage)} and running it again")
                store.delete_prefix(layout.stage_uri(stage))
                state["attempts"].pop(stage.value, None)

        for needed in required_before(stages, graph):
            if not store.is_complete(layout.stage_uri(needed)):
                raise RunError(f"{STAGE_TITLES[stages[0]]} needs the output of {STAGE_TITLES[needed]}, which is not "
                               f"in {layout.stage_uri(needed)}: run that step first (e.g. `--step 1 2 3`)")

        for index, stage in enumerate(stages, start=1):
            title = f"[{index}/{len(stages)}] {STAGE_TITLES[stage]}"
            if store.is_complete(layout.stage_uri(stage)):
                console.stage_skip(title, f"already complete in {layout.stage_uri(stage)}: not run again")
                result.skipped.append(stage.value)
                continue
            ckpts = store.list_checkpoints(layout.ckpt_root(stage))
            attempt = int(state["attempts"].get(stage.value, 0))
            nodes, ranks = num_nodes(staged, stage), nproc_per_node(staged, stage)
            console.stage_start(title, f"{nodes} node(s) x {ranks} rank(s), {staged.spec.accelerator.value}, "
                                       f"attempt {attempt}"
                                + (f", resuming from checkpoint step-{ckpts[-1][0]}" if ckpts else ""))
            state["attempts"][stage.value] = attempt + 1
            state["fingerprints"][stage.value] = fingerprints[stage.value]
            _write_state(out, state)
            elapsed = _run_stage(staged, stage, namespace, run_id, attempt, creds, out, opts, console)
            result.stage_times[stage.value] = elapsed
            if not store.is_complete(layout.stage_uri(stage)):
                raise RunError(f"{stage.value} exited 0 but did not commit {layout.stage_uri(stage)}/_COMPLETE: "
                               f"see {out / 'logs'}")
            summary = _stage_summary(store, layout, stage)
            console.stage_done(title, f"finished in {format_duration(elapsed)}: {summary}")

        console.header("collecting outputs")
        from kuberlhf.runner.outputs import collect_outputs

        records = collect_outputs(store, layout, staged, out, console)
    from kuberlhf.runner.plots import write_plots

    result.plots = write_plots(records, out / "plots")
    for p in result.plots:
        console.info(f"plot: {p}")
    if opts.samples and pipeline.spec.final_stage in stages:
        result.evaluation = _samples(out, staged, opts.samples, console)
    state = _read_state(out)
    state["finished"] = time.time()
    state["stageSeconds"] = {**state.get("stageSeconds", {}), **{k: round(v, 1) for k, v in result.stage_times.items()}}
    if result.evaluation:
        state["evaluation"] = result.evaluation
    _write_state(out, state)
    console.finish(out, time.monotonic() - t_run, staged)
    return result

def node_envs(pipeline: RLHFPipeline, stage: Stage, namespace: str, run_id: str, attempt: int,
              creds: Mapping[str, str], out: Path, port: int) -> list[dict[str, str]]:
    """The environment of each node process of a stage attempt: the contract env, the store's credentials, and
    node scratch inside the output directory (``KUBERLHF_WORK_DIR``), so two runs never share a scratch folder
    whatever their pipelines' names, uids and stores (a re-run into the same directory is the same run)."""
    envs = []
    for rank in range(num_nodes(pipeline, stage)):
        env = dict(os.environ)
        env.update(stage_env(pipeline, stage, namespace=namespace, uid=run_id, attempt=attempt,
                             master_addr="127.0.0.1", master_port=port, node_rank=rank))
        # KUBERLHF_LOCAL_OUTPUT stays unset: the runner downloads the committed results itself (verified), so
        # the models are not written twice
        env.update(creds)
        env[ENV_WORK_DIR] = str(out.resolve() / ".kuberlhf" / "work")
        envs.append(env)
    return envs


def _run_stage(pipeline: RLHFPipeline, stage: Stage, namespace: str, run_id: str, attempt: int,
               creds: Mapping[str, str], out: Path, opts: RunOptions, console: Console) -> float:
    from kuberlhf.runner.launch import free_port, run_nodes, tail_text

    envs = node_envs(pipeline, stage, namespace, run_id, attempt, creds, out, free_port())
    echo = sys.stdout.buffer if opts.echo_stage_output else None
    sys.stdout.flush()
    res = run_nodes(stage_command(stage), envs, out / "logs", f"{stage.value}-attempt{attempt}", echo=echo)
    sys.stdout.flush()
    if not res.ok:
        rank = res.failed_rank or 0
        log = res.log_paths[rank]
        tail = tail_text(log.read_bytes()) if log.exists() else "(no output)"
        raise RunError(f"stage {stage.value} failed on node {rank} (exit code {res.returncodes[rank]}) after "
                       f"{format_duration(res.elapsed_s)}. Last lines of {log}:\n{tail}\n"
                       f"Fix the cause and run the same command again: completed stages and the newest complete "
                       f"checkpoint are kept.")
    return res.elapsed_s

def _stage_summary(store: Any, layout: StageLayout, stage: Stage) -> str:
    from kuberlhf.runner.metrics import parse_jsonl, summarize_stage

    uri = f"{layout.stage_uri(stage)}/{METRICS_FILE}"
    try:
        records = parse_jsonl(store.get_bytes(uri).decode())
    except Exception:  # noqa: BLE001 - a summary must never fail a finished stage
        return "(no metrics.jsonl)"
    return summarize_stage(records, stage.value)

def _samples(out: Path, pipeline: RLHFPipeline, n: int, console: Console) -> dict[str, Any] | None:
    try:
        from kuberlhf.runner.samples import show_samples

        return show_samples(out, pipeline, n, console)
    except Exception as e:  # noqa: BLE001 - samples are a courtesy; the run's outputs are already complete
        console.warn(f"could not generate sample answers: {type(e).__name__}: {e}")
        return None
