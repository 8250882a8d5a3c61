"""The top-level `kuberlhf` command."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from kuberlhf.cli import app


def test_deepspeed_launcher_local_rank_before_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    """The DeepSpeed launcher runs `kuberlhf --local_rank=N stage NAME`: accepted, and kept as LOCAL_RANK."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    result = CliRunner().invoke(app, ["--local_rank=3", "stage", "--help"])
    assert result.exit_code == 0, result.output
    assert os.environ["LOCAL_RANK"] == "3"


def test_every_command_is_registered() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("stage", "run", "train", "serve", "chat"):
        assert command in result.output
