"""Fixtures of the storage tests: a store bound to the session SeaweedFS server, and checkpoint-like trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from kuberlhf.storage import ObjectStore
from storage.trees import write_tree


@pytest.fixture()
def store(s3_env) -> ObjectStore:
    """An ObjectStore talking to the session SeaweedFS server with its credentials (from the environment)."""
    return ObjectStore.from_uri("s3://unused", endpoint=s3_env.endpoint)


@pytest.fixture()
def small_tree(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path / "ckpt",
        {
            "config.json": b'{"model_type": "opt"}',
            "empty.txt": b"",
            "weights/part-0.bin": 300_000,
            "weights/part-1.bin": 5_000,
            "tokenizer/tokenizer.json": b'{"v": 1}',
        },
    )
