"""Shared test set-up: offline hub, one thread per process, and the real SeaweedFS S3 server."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# Tests never reach a hub: a hub name must fail fast instead of retrying for ~30 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kuberlhf" / "torch_extensions"))

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_ASSETS = REPO_ROOT / "trainer_image" / "kuberlhf" / "assets" / "tiny-opt"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real SeaweedFS (`weed mini`) S3 server on loopback with access keys; shared by the session."""
    from kuberlhf.storage.seaweed import SeaweedServer

    with SeaweedServer(data_dir=tmp_path_factory.mktemp("seaweed")) as server:
        yield server


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket's s3:// URI on the session server."""
    import uuid

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return f"s3://{name}"


@pytest.fixture()
def s3_env(s3_server, monkeypatch: pytest.MonkeyPatch):
    """Credentials of the session server in the environment, as a stage pod gets them from the Secret."""
    for k, v in s3_server.credentials_env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OPT (2 layers, hidden 64) with random weights and the shipped tokenizer, in HF layout."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-opt")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_ASSETS))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(TINY_ASSETS).save_pretrained(out)
    return out


def which_or_skip(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run `bash hack/setup.sh --test`")
    return path
