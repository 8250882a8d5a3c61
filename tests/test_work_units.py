"""The parallel run's work units (tests/conftest.py): every timed unit still exists and the shared directories stay
one unit each."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _conftest():
    # by path: several directories have a conftest.py, and which one "import conftest" finds depends on the run
    spec = importlib.util.spec_from_file_location("kuberlhf_tests_conftest", REPO / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_timed_unit_exists_and_shared_directories_are_one_unit() -> None:
    conftest = _conftest()
    missing = [unit for unit in conftest.UNIT_SECONDS if not (REPO / unit).exists()]
    assert not missing, f"UNIT_SECONDS names units that no longer exist (renamed?): {missing}"
    for unit in conftest.SHARED_UNITS:
        assert unit in conftest.UNIT_SECONDS and conftest.work_unit(f"{unit}test_x.py::test_y") == unit
    assert conftest.work_unit("tests/runner/test_e2e_tiny.py::test_a") == "tests/runner/test_e2e_tiny.py"
