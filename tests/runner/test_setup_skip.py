"""hack/venv_satisfies.py: hack/setup.sh installs nothing when the venv already holds what pyproject.toml asks
for, and installs when anything is missing, too old, or kuberlhf is not this checkout's editable install. Run
against this interpreter's real installed distributions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))
import venv_satisfies as vs  # noqa: E402 - hack/ is not a package


def test_installed_requirements_are_met_transitively_and_missing_or_old_ones_named() -> None:
    assert vs.unmet(["pydantic>=2.6,<3", "transformers", "typer>=0.12"]) == []
    problems = vs.unmet(["pydantic>=99", "no-such-distribution-kuberlhf"])
    assert sorted(problems) == sorted(
        [f"pydantic>=99: {metadata.version('pydantic')} is installed", "no-such-distribution-kuberlhf: not installed"]
    )
    # a marker that does not hold here is not required
    assert vs.unmet(['no-such-distribution-kuberlhf; python_version < "3"']) == []


def test_pyproject_extras_are_read_and_an_unknown_one_named() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    reqs = vs.pyproject_requirements(pyproject, ["trainer", "operator"])
    assert "pydantic>=2.6,<3" in reqs and "torch>=2.4" in reqs and "kopf>=1.37" in reqs
    assert not any(r.startswith("pytest") for r in reqs)
    with pytest.raises(KeyError, match="no extra 'gpu'"):
        vs.pyproject_requirements(pyproject, ["gpu"])


def test_kuberlhf_must_be_this_checkouts_editable_install(tmp_path: Path) -> None:
    reqs = vs.pyproject_requirements(tomllib.loads((REPO / "pyproject.toml").read_text()), ["trainer"])
    problems = vs.editable_problems(tmp_path, reqs)  # a checkout kuberlhf was not installed from
    assert len(problems) == 1 and f"not editable from {tmp_path}" in problems[0]
    direct = json.loads(metadata.distribution("kuberlhf").read_text("direct_url.json") or "{}")
    installed_root = Path(direct.get("url", "").removeprefix("file://"))
    if direct.get("dir_info", {}).get("editable") and installed_root.exists():
        # the checkout it was installed from (this one in CI): satisfied, until its pyproject asks for more
        assert vs.editable_problems(installed_root, reqs) == []
        assert vs.editable_problems(installed_root, [*reqs, "no-such-distribution-kuberlhf>=1"]) == [
            "kuberlhf: its installed metadata lacks no-such-distribution-kuberlhf>=1 (pyproject.toml changed since)"
        ]


def test_setup_sh_checks_before_it_installs_and_passes_shellcheck() -> None:
    script = REPO / "hack" / "setup.sh"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: run `bash hack/setup.sh --test`"
    res = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    text = script.read_text()
    assert text.index("hack/venv_satisfies.py") < text.index('pip_install -e ".[$extras]"')
