"""Fixtures of the operator's unit tier: a small valid spec, its metadata and a simulated cluster."""

from __future__ import annotations

from typing import Any

import pytest
from operator_sim import Cluster

from kuberlhf_operator.reconcile import PipelineMeta


@pytest.fixture()
def spec() -> dict[str, Any]:
    return {
        "deploymentType": "single_node",
        "accelerator": "cpu",
        "actor": {"model": "kuberlhf/tiny-opt"},
        "reward": {"model": "kuberlhf/tiny-opt"},
        "data": {"datasets": ["kuberlhf/synthetic-pairs"], "unsupervised": "kuberlhf/synthetic-corpus"},
        "storage": {"uri": "s3://bucket/pipelines", "endpoint": "http://127.0.0.1:8333",
                    "secretRef": {"name": "s3-credentials"}},
        "stages": {"sft": {"nodes": 1, "gpusPerNode": 2, "backoffLimit": 1},
                   "reward": {"nodes": 1, "gpusPerNode": 2},
                   "ppo": {"nodes": 1, "gpusPerNode": 2}},
    }


@pytest.fixture()
def meta() -> PipelineMeta:
    return PipelineMeta(name="tiny", namespace="team", uid="0000-uid", generation=1)


@pytest.fixture()
def cluster(meta: PipelineMeta, spec: dict[str, Any]) -> Cluster:
    return Cluster(meta, spec)
