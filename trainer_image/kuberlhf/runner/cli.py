"""``kuberlhf run`` and ``kuberlhf train``. Light at import time: the work happens in other modules."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer

from kuberlhf.contract.spec import Algorithm, DeploymentType
from kuberlhf.runner.storage_choice import StorageMode

EXIT_SPEC = 2  # the manifest or flags are wrong: nothing ran
EXIT_FAILED = 1  # a stage (or the store) failed
EXIT_INTERRUPTED = 130


class AcceleratorOpt(str, Enum):
    auto = "auto"
    cuda = "cuda"
    cpu = "cpu"


def _execute(pipeline, output_dir: Path, fresh: bool, storage: StorageMode, samples: int, stages=None) -> None:
    from kuberlhf.runner.console import Console
    from kuberlhf.runner.local import RunError, RunOptions, run_pipeline

    console = Console()
    opts = RunOptions(output_dir=output_dir, stages=stages, fresh=fresh, storage_mode=storage, samples=samples)
    try:
        run_pipeline(pipeline, opts, console)
    except RunError as e:
        console.error(str(e))
        raise typer.Exit(EXIT_FAILED) from None
    except KeyboardInterrupt:
        console.error("interrupted; run the same command again to resume (completed stages and checkpoints are kept)")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Exception as e:
        # storage errors and the like: one clear line, the traceback only on request
        from kuberlhf.storage import StorageError

        if isinstance(e, (StorageError, ValueError, FileNotFoundError)):
            console.error(f"{type(e).__name__}: {e}")
            raise typer.Exit(EXIT_FAILED) from None
        raise


def run(
    pipeline_file: Path = typer.Argument(..., help="RLHFPipeline manifest (the same YAML kubectl applies)."),
    output_dir: Path = typer.Option(Path("out"), "--output-dir", "-o", help="Models, metrics, plots and logs go here."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard this output directory's earlier run instead of resuming."),
    storage: StorageMode = typer.Option(StorageMode.auto, "--storage",
                                        help="auto: the manifest's store when reachable, else an embedded SeaweedFS; "
                                             "embedded: always embedded; manifest: never embedded."),
    samples: int = typer.Option(3, "--samples", min=0, help="Sample Human/Assistant exchanges printed at the end."),
) -> None:
    """Run a whole RLHFPipeline on this machine: SFT -> reward model -> PPO, each stage as local processes
    through the same stage contract as on Kubernetes. Re-running resumes."""
    from kuberlhf.contract.preflight import PreflightError, check_spec
    from kuberlhf.contract.spec import SpecError, load_pipeline_file
    from kuberlhf.runner.console import Console

    try:
        pipeline = load_pipeline_file(str(pipeline_file))
        check_spec(pipeline.spec, local=True)
    except SpecError as e:
        Console().error(f"{e}\nnothing was run.")
        raise typer.Exit(EXIT_SPEC) from None
    except PreflightError as e:
        Console().error(f"{pipeline_file}: {e}\nnothing was run.")
        raise typer.Exit(EXIT_SPEC) from None
    _execute(pipeline, output_dir, fresh, storage, samples)


def train(
    ctx: typer.Context,
    actor_model: str = typer.Option("facebook/opt-1.3b", "--actor-model",
                                    help="Any HF causal LM: hub name, local directory, s3:// URI (or an OPT size like 1.3b)."),
    reward_model: str = typer.Option("facebook/opt-350m", "--reward-model", help="Reward/critic base model "
                                     "(ppo, and grpo without --reward-function)."),
    algorithm: Algorithm = typer.Option(Algorithm.ppo, "--algorithm", help="What follows step 1: ppo (sft -> reward -> ppo), "
                                  "dpo (sft -> dpo) or grpo (sft -> [reward ->] grpo)."),
    reward_function: str | None = typer.Option(None, "--reward-function", help="grpo: score answers with "
                                               "'module:function' or 'FILE.py:function' instead of a reward model."),
    deployment_type: DeploymentType = typer.Option(DeploymentType.single_gpu, "--deployment-type",
                                                      help="DeepSpeed-Chat recipe preset."),
    step: list[int] = typer.Option([], "--step", help="Steps to run: --step 1 2 3 (default: all)."),
    actor_zero_stage: int | None = typer.Option(None, "--actor-zero-stage", min=0, max=3,
                                                help="ZeRO stage of step 1 and the PPO actor."),
    reward_zero_stage: int | None = typer.Option(None, "--reward-zero-stage", min=0, max=3,
                                                 help="ZeRO stage of step 2 and the PPO critic."),
    output_dir: Path = typer.Option(Path("output"), "--output-dir", help="Local run: models, metrics, plots."),
    dataset: list[str] = typer.Option([], "--dataset", help="Dataset(s) (hub names or files); default Dahoas/rm-static."),
    data_split: str | None = typer.Option(None, "--data-split", help="Share of each dataset for steps 1, 2, 3 "
                                                                      "(default: data.split's, 2,4,4)."),
    unsupervised_dataset: str | None = typer.Option(None, "--unsupervised-dataset", help="ptx corpus for step 3."),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="Max tokens of steps 1-2 (data.maxSeqLen)."),
    max_prompt_seq_len: int | None = typer.Option(None, "--max-prompt-seq-len",
                                                  help="Step 3 prompt tokens (stages.ppo.maxPromptLen)."),
    max_answer_seq_len: int | None = typer.Option(None, "--max-answer-seq-len",
                                                  help="Step 3 generated tokens (stages.ppo.maxAnswerLen)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Cap on every stage's optimizer steps "
                                                                    "(a quick try, e.g. on a CPU)."),
    accelerator: AcceleratorOpt = typer.Option(AcceleratorOpt.auto, "--accelerator",
                                               help="auto: cuda when emitting or when a GPU is here, else cpu."),
    name: str | None = typer.Option(None, "--name", help="metadata.name (default: from the actor model)."),
    namespace: str | None = typer.Option(None, "--namespace", help="metadata.namespace of the emitted manifest."),
    storage_uri: str = typer.Option("s3://kuberlhf/pipelines", "--storage-uri", help="Where checkpoints go."),
    storage_endpoint: str | None = typer.Option("http://seaweedfs.kuberlhf:8333", "--storage-endpoint",
                                                help="S3 endpoint ('' for AWS S3)."),
    storage_secret: str | None = typer.Option("s3-credentials", "--storage-secret",
                                              help="Secret with the S3 keys (cluster runs)."),
    image: str | None = typer.Option(None, "--image", help="Trainer image (default: the operator's)."),
    emit: Path | None = typer.Option(None, "--emit", help="Write the RLHFPipeline YAML here ('-' = stdout) "
                                                          "for kubectl apply, instead of running."),
    fresh: bool = typer.Option(False, "--fresh", help="Local run: discard an earlier run in --output-dir."),
    storage: StorageMode = typer.Option(StorageMode.auto, "--storage", help="Local run: see `kuberlhf run --help`."),
    samples: int = typer.Option(3, "--samples", min=0, help="Local run: sample exchanges printed at the end."),
) -> None:
    """DeepSpeed-Chat's e2e_rlhf.py: the three steps with its recipe for a deployment type (or SFT -> DPO, or
    SFT -> [reward ->] GRPO with --algorithm), run here or emitted as an RLHFPipeline for `kubectl apply`."""
    from kuberlhf.contract.preflight import PreflightError, check_spec
    from kuberlhf.contract.spec import SpecError
    from kuberlhf.runner.console import Console
    from kuberlhf.runner.deepspeed_chat import build_train_pipeline, emit_yaml, steps_to_stages

    console = Console()
    try:
        # `--step 1 2 3` as in e2e_rlhf.py: click takes `--step 1`, the rest arrive as extra arguments
        extra = list(ctx.args)
        bad = [a for a in extra if not a.isdigit()]
        if bad:
            raise SpecError(f"unexpected argument(s) {bad}: see `kuberlhf train --help`")
        if accelerator is AcceleratorOpt.auto:
            accel = "cuda" if emit is not None or _has_cuda() else "cpu"
        else:
            accel = accelerator.value
        pipeline = build_train_pipeline(
            actor_model=actor_model, reward_model=reward_model, algorithm=algorithm.value, reward_function=reward_function,
            deployment_type=deployment_type.value,
            actor_zero_stage=actor_zero_stage, reward_zero_stage=reward_zero_stage,
            datasets=dataset or ["Dahoas/rm-static"], data_split=data_split,
            unsupervised_dataset=unsupervised_dataset, accelerator=accel, name=name, namespace=namespace,
            storage_uri=storage_uri, storage_endpoint=storage_endpoint or None, storage_secret=storage_secret or None,
            image=image, max_seq_len=max_seq_len, max_prompt_seq_len=max_prompt_seq_len,
            max_answer_seq_len=max_answer_seq_len, max_steps=max_steps,
        )
        steps = [*step, *(int(a) for a in extra)]
        stages = steps_to_stages(steps, pipeline.spec.stage_graph) if steps else None
        # an emitted manifest's local paths are read in the pods, a local run's here
        check_spec(pipeline.spec, local=emit is None)
    except (SpecError, PreflightError) as e:
        console.error(f"{e}\nnothing was run.")
        raise typer.Exit(EXIT_SPEC) from None
    if emit is not None:
        text = emit_yaml(pipeline)
        if str(emit) == "-":
            typer.echo(text, nl=False)
        else:
            emit.parent.mkdir(parents=True, exist_ok=True)
            emit.write_text(text)
            console.line(f"wrote {emit}: apply it with `kubectl apply -f {emit}`")
        if stages is not None and len(stages) < len(pipeline.spec.stage_graph):
            # stderr: with --emit - the YAML on stdout must stay clean for a pipe into kubectl
            typer.echo("note: --step is for local runs; the operator runs every step and skips completed ones",
                       err=True)
        return
    _execute(pipeline, output_dir, fresh, storage, samples, stages=stages)


def _has_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        return False


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(train)
