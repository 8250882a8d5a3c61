"""Fixtures of the chart/packaging tests: the real Helm 3.17.2 binary (see helm.py) and rendering helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from chart.helm import CHART_DIR, helm_binary

HERE = Path(__file__).resolve().parent
CI_VALUES = HERE / "ci-values.yaml"
KIND_VALUES = CHART_DIR.parents[1] / "hack" / "kind-values.yaml"


@pytest.fixture(scope="session")
def helm() -> Path:
    return helm_binary()
