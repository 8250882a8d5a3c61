"""Reading the cluster: everything a pipeline owns, reduced by the pure summaries of ``observe`` to what reconcile
reads. Children are found by label, then kept only when their ownerReference carries the pipeline's uid (so a
re-created pipeline of the same name never adopts the old one's children)."""

from __future__ import annotations

from typing import Any

from kuberlhf.contract.pod import TRAINER_CONTAINER
from kuberlhf_operator import LABEL_ATTEMPT, LABEL_COMPONENT, LABEL_PIPELINE, LABEL_STAGE
from kuberlhf_operator.kube import Kube
from kuberlhf_operator.manifests import job_name
from kuberlhf_operator.observe import (
    JobState,
    Observed,
    PodsState,
    classify_failure,
    create_refusal,
    failure_detail,
    pod_failure,
    summarize_deployment,
    summarize_job,
    summarize_pods,
)
from kuberlhf_operator.reconcile import PipelineMeta
from kuberlhf_operator.watch_cache import WatchCache


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def gather(kube: Kube, meta: PipelineMeta, status: dict[str, Any], cache: WatchCache | None = None) -> Observed:
    """Everything the pipeline owns (by label, then by ownerReference uid so a re-created pipeline of the same
    name never adopts the old one's children), plus failure text of failed current-attempt Jobs.

    With ``cache`` (the operator's kopf indexes) the children come from the watch streams instead of one list per
    kind (watch_cache says why a lagging view is safe); the pods of a current attempt whose Job failed are listed
    fresh all the same, since what they say decides whether the attempt is retried."""
    selector = f"{LABEL_PIPELINE}={meta.name}"

    def owned(kind: str) -> list[dict[str, Any]]:
        found = cache.list(kind, meta.namespace, meta.name) if cache else kube.list(kind, meta.namespace, selector)
        return [o for o in found if _owned_by(o, meta.uid)]

    jobs = {}
    for raw in owned("Job"):
        state = summarize_job(raw)
        if state is not None:
            jobs[state.name] = state
    services = frozenset(s["metadata"]["name"] for s in owned("Service"))
    deployments = {d["metadata"]["name"]: summarize_deployment(d) for d in owned("Deployment")}
    policies = frozenset(p["metadata"]["name"] for p in owned("NetworkPolicy"))
    stages_st = status.get("stages") or {}

    def current(job: JobState) -> bool:
        st = stages_st.get(job.stage) or {}
        return st.get("phase") not in ("Failed", "Succeeded") and job.attempt >= int(st.get("attempts") or 0)

    # Pods only of the current attempts' Jobs that still run (Pending vs Running) or failed (the failure text), and
    # of the unfinished stages' earlier failed attempts (was each a disruption, which uses no attempt?).
    wanted = [j for j in jobs.values() if current(j) and not j.deleting and j.phase in ("Running", "Failed")]
    earlier = [j for j in jobs.values() if j.phase == "Failed" and not current(j)
               and (stages_st.get(j.stage) or {}).get("phase") not in ("Failed", "Succeeded")]
    by_job: dict[str, list[dict[str, Any]]] = {j.name: [] for j in wanted + earlier}
    if wanted:
        failed = any(j.phase == "Failed" for j in wanted)
        pods_found = (cache.list("Pod", meta.namespace, meta.name) if cache is not None and not failed
                      else stage_pods(kube, meta))
        for pod in pods_found:
            labels = pod["metadata"].get("labels") or {}
            try:
                name = job_name(meta.name, labels[LABEL_STAGE], int(labels[LABEL_ATTEMPT]))
            except (KeyError, ValueError):
                continue
            if name in by_job:
                by_job[name].append(pod)
    details: dict[str, str] = {}
    pods: dict[str, PodsState] = {}
    kinds = {j.name: classify_failure(by_job[j.name]) for j in wanted + earlier if j.phase == "Failed"}
    refusals: dict[str, str] = {}
    for job in wanted:
        if job.phase == "Running":
            pods[job.name] = summarize_pods(by_job[job.name])
            if not by_job[job.name] and not job.suspended:
                refusal = create_refusal(kube.list_events(meta.namespace, "Job", job.name, "FailedCreate"))
                if refusal:
                    refusals[job.name] = refusal
            continue
        logs = {}
        for pod in by_job[job.name]:
            summary, wants_log = pod_failure(pod)
            if summary is not None and wants_log:
                pod_name = pod["metadata"]["name"]
                logs[pod_name] = kube.pod_log_tail(meta.namespace, pod_name, TRAINER_CONTAINER)
        text = failure_detail(by_job[job.name], logs)
        if text:
            details[job.name] = text
    return Observed(jobs=jobs, services=services, deployments=deployments, failure_details=details, pods=pods,
                    network_policies=policies, failure_kinds=kinds, create_refusals=refusals)


def stage_pods(kube: Kube, meta: PipelineMeta) -> list[dict[str, Any]]:
    """Every stage pod of the pipeline (label selector; the caller narrows by stage and attempt)."""
    return kube.list("Pod", meta.namespace, f"{LABEL_PIPELINE}={meta.name},{LABEL_COMPONENT}=stage")
