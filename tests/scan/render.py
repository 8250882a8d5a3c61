"""Everything kuberlhf puts on a cluster, rendered without one: the chart in every install mode (real helm) and
the children the operator builds for every example pipeline (its pure manifest builders)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from chart.helm import render_chart

REPO = Path(__file__).resolve().parents[2]
SEAWEEDFS = ["seaweedfs.enabled=true", "seaweedfs.auth.accessKey=scan-ak", "seaweedfs.auth.secretKey=scan-sk"]
CHART_MODES: dict[str, list[str]] = {
    "namespaced": [],
    "several-namespaces": ["watch.namespaces={team-a,team-b}"],
    "cluster-wide": ["watch.allNamespaces=true"],
    "seaweedfs": SEAWEEDFS,
    "seaweedfs-persistent": [*SEAWEEDFS, "seaweedfs.persistence.enabled=true"],
}


def chart_objects(mode: str) -> list[dict[str, Any]]:
    # the CRD is a schema, not a workload: scanners have nothing to say about it
    return render_chart(namespace="kuberlhf-system", set_values=CHART_MODES[mode], include_crds=False)


def examples() -> list[Path]:
    return sorted(
        p
        for p in (REPO / "examples").glob("*.yaml")
        if (yaml.safe_load(p.read_text()) or {}).get("kind") == "RLHFPipeline"
    )


def example_children(path: Path) -> list[dict[str, Any]]:
    """What the operator creates for the example, from the same builders reconcile uses: per stage (first attempt)
    the Job, its headless Service and NetworkPolicy; the chat Deployment, Service, NetworkPolicy, generated API-key
    Secret (unless the example names its own or turns auth off) and, with several replicas, PodDisruptionBudget."""
    from kuberlhf.contract.spec import load_pipeline_file
    from kuberlhf_operator.manifests import (
        Owner,
        build_chat_api_key_secret,
        build_chat_deployment,
        build_chat_disruption_budget,
        build_chat_network_policy,
        build_chat_service,
        build_stage_job,
        build_stage_network_policy,
        build_stage_service,
    )

    pipeline = load_pipeline_file(str(path))
    owner = Owner(name=pipeline.metadata.name, namespace="team-a", uid="00000000-0000-0000-0000-000000000001")
    objects: list[dict[str, Any]] = []
    for stage in pipeline.spec.stage_graph:
        objects.append(build_stage_job(pipeline, owner, stage, 1, default_image="ghcr.io/kuberlhf/trainer:0.1.0"))
        objects.append(build_stage_service(owner, stage, 1))
        if pipeline.spec.network.policies:
            objects.append(build_stage_network_policy(pipeline, owner, stage, 1))
    sv = pipeline.spec.serving
    if sv.enabled:
        objects.append(build_chat_deployment(pipeline, owner, default_image="ghcr.io/kuberlhf/trainer:0.1.0"))
        objects.append(build_chat_service(pipeline, owner))
        if pipeline.spec.network.policies:
            objects.append(build_chat_network_policy(pipeline, owner))
        if sv.auth and sv.api_key_secret_ref is None:
            objects.append(build_chat_api_key_secret(owner))
        if sv.replicas > 1:
            objects.append(build_chat_disruption_budget(pipeline, owner))
    return objects
