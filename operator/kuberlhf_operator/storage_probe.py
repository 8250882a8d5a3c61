"""The storage probe and its credentials: did a stage whose Job succeeded commit its output (``_COMPLETE`` and the
manifest digest)? Read with exactly the keys of the pipeline's ``spec.storage.secretRef``; without one (workload
identity) the operator never signs a request and takes the succeeded stage pods' own reports instead.

Object-store clients are cached per (endpoint, credentials) in a :class:`~kuberlhf_operator.wakeups.StoreCache`
the operator object owns."""

from __future__ import annotations

import base64
from typing import Any

from kuberlhf.contract.spec import StorageSpec
from kuberlhf.contract.stage import ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY, StageLayout
from kuberlhf_operator import LABEL_ATTEMPT, LABEL_STAGE
from kuberlhf_operator.cluster import stage_pods
from kuberlhf_operator.kube import Kube
from kuberlhf_operator.observe import Observed, reported_digest
from kuberlhf_operator.reconcile import PipelineMeta, ProbeResult, stages_to_probe, storage_for_probe
from kuberlhf_operator.wakeups import StoreCache


def storage_env(kube: Kube, namespace: str, storage: StorageSpec) -> dict[str, str]:
    """S3 credentials for the operator's own checks: exactly the keys of the Secret the pods use. Never the
    operator's own environment or identity: the endpoint is the tenant's choice, and signing requests to it with
    the operator's credentials would hand them (or its bucket rights) to whoever runs that endpoint."""
    if storage.secret_ref is None:
        raise ValueError("no spec.storage.secretRef: the operator does not sign requests with its own identity")
    secret = kube.get("Secret", namespace, storage.secret_ref.name)
    if secret is None:
        raise RuntimeError(f"Secret {namespace}/{storage.secret_ref.name} (spec.storage.secretRef) not found")
    data = secret.get("data") or {}
    env = {}
    for key in (ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY):
        if key not in data:
            raise RuntimeError(f"Secret {storage.secret_ref.name} lacks key {key} (spec.storage.secretRef)")
        env[key] = base64.b64decode(data[key]).decode()
    return env


def reported_probes(kube: Kube, meta: PipelineMeta, stages: list[str], observed: Observed,
                    layout: StageLayout) -> dict[str, ProbeResult]:
    """Workload-identity mode (no secretRef): what the succeeded stage pods reported committing, since the
    operator does not read the bucket."""
    pods = stage_pods(kube, meta)
    out = {}
    for stage in stages:
        done = [j for j in observed.jobs.values() if j.stage == stage and j.phase == "Succeeded"]
        attempt = max(j.attempt for j in done)
        mine = [p for p in pods if _owned_by_job(p, stage, attempt)]
        uri = layout.stage_uri(stage)
        digest = reported_digest(mine, stage, uri)
        out[stage] = ProbeResult(digest is not None, checkpoint=uri, manifest_sha256=digest)
    return out


def _owned_by_job(pod: dict[str, Any], stage: str, attempt: int) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return labels.get(LABEL_STAGE) == stage and labels.get(LABEL_ATTEMPT) == str(attempt)


def probe(kube: Kube, stores: StoreCache, meta: PipelineMeta, spec: dict[str, Any], status: dict[str, Any],
          observed: Observed) -> dict[str, ProbeResult]:
    """Whether the stages whose Job succeeded committed their output: ``_COMPLETE`` and the manifest digest in
    the object store, read with the pipeline's own secretRef keys; without a secretRef, the stage pods' reports."""
    stages = stages_to_probe(status, observed)
    if not stages:
        return {}
    try:
        storage = StorageSpec.model_validate(storage_for_probe(spec, observed))
        layout = StageLayout(storage_uri=storage.uri, namespace=meta.namespace, pipeline=meta.name, uid=meta.uid)
        if storage.secret_ref is None:
            return reported_probes(kube, meta, stages, observed, layout)
        store = stores.get(storage, storage_env(kube, meta.namespace, storage))
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot tell yet": retry later
        return {s: ProbeResult(False, error=f"{type(e).__name__}: {e}") for s in stages}
    out = {}
    for stage in stages:
        uri = layout.stage_uri(stage)
        try:
            complete = store.is_complete(uri)
            manifest = store.read_manifest(uri) if complete else None
            out[stage] = ProbeResult(complete, checkpoint=uri, manifest_sha256=getattr(manifest, "sha256", None))
        except Exception as e:  # noqa: BLE001
            out[stage] = ProbeResult(False, checkpoint=uri, error=f"{type(e).__name__}: {e}")
    return out
