"""The `kuberlhf` command. Each concern registers its own sub-commands; importing this module stays light
(heavy imports such as torch happen inside the commands)."""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    name="kuberlhf",
    help="RLHF (DeepSpeed-Chat's SFT -> reward model -> PPO) on Kubernetes, or on one machine.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root(
    local_rank: int | None = typer.Option(
        None, "--local_rank", "--local-rank", hidden=True,
        help="set by the DeepSpeed launcher, which puts it before the sub-command",
    ),
) -> None:
    # `deepspeed $(which kuberlhf) stage sft` runs `kuberlhf --local_rank=N stage sft`: keep the rank for the
    # stage entrypoint, which reads LOCAL_RANK like under torchrun.
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)


# module -> registers: `stage` (stage entrypoints), `run`/`train` (local runner), `chat`/`serve` (serving),
# `plan` (memory planner)
COMMAND_MODULES = ("kuberlhf.stages.cli", "kuberlhf.runner.cli", "kuberlhf.serving.cli", "kuberlhf.planner.cli")

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


if __name__ == "__main__":
    app()
