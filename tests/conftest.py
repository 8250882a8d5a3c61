"""Shared test set-up: offline hub, one thread per process, the real SeaweedFS S3 server, and the work units of a
parallel run (hack/test.sh runs pytest-xdist, ``-n 2``)."""

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

# Directories whose modules share session fixtures that take long to start: each is one work unit, so a parallel
# run starts them once (the e2e tier's control plane + process kubelet, the serving tier's two servers).
SHARED_UNITS = ("tests/e2e/", "tests/serving/")
# Seconds per work unit (ci21's 30 slowest --durations on 2 workers, summed per unit and rounded up; tests/e2e/, of
# which ci21 lists only 3 tests, estimated from a serial run at load 10-20 on 2026-12-01: 1358 s + 359 s for the
# dpo/grpo e2e, its tiny pipeline 5.5x ci21's): the parallel run hands out the longest first, so that no long unit
# starts last and runs alone. A unit not listed counts as short. Only the order of the work depends on these
# figures, never a result.
UNIT_SECONDS = {
    "tests/e2e/": 500,
    "tests/runner/test_e2e_tiny.py": 470,
    "tests/trainer/test_stages.py": 460,
    "tests/scan/test_scan.py": 170,
    "tests/runner/test_train_command.py": 150,
    "tests/runner/test_rlhf_quality_quick.py": 140,
    "tests/serving/": 130,
    "tests/runner/test_multinode_run.py": 125,
    "tests/trainer/test_zero3_partitioned.py": 95,
    "tests/trainer/test_preemption.py": 70,
    "tests/trainer/test_multinode.py": 70,
    "tests/trainer/test_algorithm_stages.py": 65,
    "tests/trainer/test_errors.py": 60,
    "tests/chart/test_chart_render.py": 50,
    "tests/trainer/test_gpu_check.py": 45,
    "tests/trainer/test_launchers.py": 35,
}


def work_unit(nodeid: str) -> str:
    """The work unit of a test in a parallel run: its directory if SHARED_UNITS has it, else its module."""
    module = nodeid.split("::", 1)[0]
    return next((d for d in SHARED_UNITS if module.startswith(d)), module)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest work unit first (UNIT_SECONDS); within a unit the collection order stays."""
    items.sort(key=lambda item: -UNIT_SECONDS.get(work_unit(item.nodeid), 0))  # stable: ties keep their order


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: called only when it runs the tests (-n N)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """xdist hands out whole work units (work_unit), in the collection order above. (Its own ``--dist loadgroup``
    cannot group them: with pytest 9 it no longer renames the items it marks.)"""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the longest-first order instead of the most-tests-first
    return WorkUnitScheduling(config, log)


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
