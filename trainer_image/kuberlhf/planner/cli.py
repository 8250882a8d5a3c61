"""``kuberlhf plan FILE``: print the memory plan; exit 1 when a stage does not fit, 2 for a bad manifest."""

from __future__ import annotations

from pathlib import Path

import typer

EXIT_DOES_NOT_FIT = 1
EXIT_SPEC = 2


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(pipeline_file: Path = typer.Argument(..., help="RLHFPipeline manifest.")) -> None:
        """Per-stage, per-GPU memory estimate (weights, gradients, optimizer, activations, KV cache) from the
        models' config.json only; exits non-zero when a stage does not fit spec.gpuMemory."""
        from kuberlhf.contract.spec import SpecError, load_pipeline_file
        from kuberlhf.planner.check import plan_problems
        from kuberlhf.planner.estimate import estimate_pipeline
        from kuberlhf.planner.shapes import ShapeError, read_model_shape
        from kuberlhf.planner.table import render

        try:
            spec = load_pipeline_file(str(pipeline_file)).spec
            shapes = {"actor": read_model_shape(spec.actor.model, "spec.actor.model", spec.storage)}
            if spec.reward_from_sft:  # step 1's model: the actor's shape
                shapes["reward"] = shapes["actor"]
            elif spec.reward is not None:
                shapes["reward"] = read_model_shape(spec.reward.model, "spec.reward.model", spec.storage)
        except (SpecError, ShapeError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(EXIT_SPEC) from None
        est = estimate_pipeline(spec, shapes)
        note = "model shapes: " + ", ".join(
            f"{role} {'sft/model' if role == 'reward' and spec.reward_from_sft else getattr(spec, role).model} "
            f"({s.source})"
            for role, s in shapes.items()
        )
        typer.echo(render(est, note))
        problems = plan_problems(spec, shapes, est)
        for p in problems:
            typer.echo(f"\n{p}")
        if problems:
            raise typer.Exit(EXIT_DOES_NOT_FIT)
