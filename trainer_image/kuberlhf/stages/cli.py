"""``kuberlhf stage sft|reward|ppo|dpo|grpo [--pipeline FILE_OR_JSON] [--no-resume]``: the container command of every
stage pod (``kuberlhf.contract.stage.stage_command``). Light at import: torch loads inside the command."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("stage", context_settings={"allow_extra_args": False})
    def stage(
        name: str = typer.Argument(..., help="sft | reward | ppo | dpo | grpo"),
        pipeline: str = typer.Option(None, "--pipeline", help="Manifest file or inline JSON (default: "
                                     "$KUBERLHF_PIPELINE)."),
        no_resume: bool = typer.Option(False, "--no-resume", help="Start over instead of resuming from the "
                                       "newest complete checkpoint."),
        local_rank: int = typer.Option(None, "--local_rank", "--local-rank", hidden=True,
                                       help="Set by the DeepSpeed launcher."),
    ) -> None:
        """Run one pipeline stage (every pod of the stage runs this; ranks are spawned per node)."""
        if name not in ("sft", "reward", "ppo", "dpo", "grpo"):
            raise typer.BadParameter(f"unknown stage {name!r}: use sft, reward, ppo, dpo or grpo", param_hint="NAME")
        from kuberlhf.stages.errors import report_errors
        from kuberlhf.stages.launch import launch

        with report_errors():
            launch(name, pipeline, resume=not no_resume, local_rank=local_rank)
