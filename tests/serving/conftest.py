"""Fixtures of the serving tests: a shared real `kuberlhf serve` process."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.servers import SHARED_API_KEY, SHARED_FLAGS, ServerProcess, start_server


@pytest.fixture(scope="session")
def chat_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("serve"),
        *SHARED_FLAGS,
        "--model-name",
        "tiny",
        env={"KUBERLHF_API_KEY": SHARED_API_KEY},
    )
    yield server
    server.stop()


# A second server: four generations at once (seeded answers must not depend on their neighbours), no API key
# (the third-party clients and schemathesis talk to it as to any OpenAI-compatible endpoint), small answers, and
# tight connection bounds so that the tests can watch them act.
OPEN_FLAGS = (
    "--max-concurrency",
    "4",
    "--max-queue",
    "8",
    "--max-new-tokens",
    "16",
    "--limit-connections",
    "12",
    "--keep-alive-timeout",
    "1",
    "--header-timeout",
    "1.5",
    "--body-timeout",
    "1.5",
)


@pytest.fixture(scope="session")
def open_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(
        tiny_model_dir,
        tmp_path_factory.mktemp("serve-open"),
        *OPEN_FLAGS,
        "--model-name",
        "tiny",
        env={"KUBERLHF_API_KEY": ""},
    )
    yield server
    server.stop()
