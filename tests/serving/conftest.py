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
