"""Linters on the packaging files: shellcheck on hack/*.sh, hadolint on the Dockerfile, and the Dockerfile rules
hadolint does not check (non-root final images, pinned bases and versions, what the images contain)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _tool(name: str) -> str:
    found = shutil.which(name) or (str(Path(sys.executable).parent / name) if (Path(sys.executable).parent / name).exists() else None)
    if found is None:
        pytest.fail(f"{name} is not installed: run `bash hack/setup.sh --test`")
    return found


PACKAGING_SCRIPTS = ["kind-e2e.sh", "helm.sh", "gpu-check.sh", "gpu-wheels.sh"]


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "hack").glob("*.sh")))
def test_shellcheck(script: str) -> None:
    # every script: no warnings or errors; the packaging and GPU scripts (run where nothing can test them): no notes
    severity = "style" if script in PACKAGING_SCRIPTS else "warning"
    proc = subprocess.run([_tool("shellcheck"), "-x", "-S", severity, f"hack/{script}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", PACKAGING_SCRIPTS)
def test_packaging_scripts_are_strict(script: str) -> None:
    assert "set -euo pipefail" in (REPO / "hack" / script).read_text()


def test_hadolint() -> None:
    proc = subprocess.run([_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions (line continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", text)
    stages: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = ""
        elif current:
            stages[current] += line + "\n"
    return stages


def test_dockerfile_targets_are_non_root_and_pinned() -> None:
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    assert {"operator", "trainer", "trainer-base-cuda", "trainer-base-cpu"} <= set(stages)
    for target in ("operator", "trainer"):
        users = re.findall(r"^USER\s+(\S+)", stages[target], re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{target} runs as {users}"
        assert "--no-cache-dir" in stages[target]
    # base images: pinned tags, never latest
    for ref in re.findall(r"^ARG\s+\w+_IMAGE=(\S+)", text, re.M):
        assert re.search(r":[0-9][\w.-]*$", ref), f"unpinned base image {ref}"
    # the operator stays torch-free; the trainer pins torch and deepspeed
    assert "torch" not in stages["operator"] and ".[operator]" in stages["operator"]
    assert re.search(r"^ARG TORCH_VERSION=\d+\.\d+\.\d+$", text, re.M)
    assert re.search(r"^ARG DEEPSPEED_VERSION=\d+\.\d+\.\d+$", text, re.M)
    for spec in re.findall(r'"([A-Za-z][\w.-]*(?:\[\w+\])?[=<>!~][^"]*)"', text):
        assert "==" in spec, f"unpinned requirement {spec}"
    # the CPU variant for kind and prebuilt CUDA ops for GPUs
    assert "ARG TRAINER_VARIANT=cuda" in text and "FROM trainer-base-${TRAINER_VARIANT} AS trainer" in text
    assert "DS_BUILD_FUSED_ADAM=1" in stages["trainer-base-cuda"]
    assert 'ENTRYPOINT ["kuberlhf-operator"]' in stages["operator"]


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "**", "start from 'ignore everything' and allow-list what the images need"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "trainer_image", "operator"}
    copied = set(re.findall(r"^COPY\s+(?!--)(\S+)", DOCKERFILE.read_text(), re.M))
    assert copied <= allowed, copied - allowed
