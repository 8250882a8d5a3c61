"""Thin kopf handlers: gather what the pipeline owns, probe the object store, call the pure ``reconcile`` and
apply its decision idempotently. One entry point (:func:`reconcile_pipeline`) serves every cause (create,
resume after an operator restart, spec update, a timer as the safety net, and Job/Pod/Deployment events that wake
the owner promptly); a per-pipeline lock keeps them from interleaving and every run reads the pipeline fresh.

Cost at scale (wakeups.py): child events reconcile only when what reconcile reads of the child changed, the timer
reconciles a pipeline only when it is due (a requeue the decision asked for, else a safety interval that grows
with the number of pipelines), and object-store clients are cached per endpoint and credentials."""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kuberlhf.contract.pod import TRAINER_CONTAINER
from kuberlhf.contract.spec import API_GROUP, API_VERSION, KIND, PLURAL, StorageSpec
from kuberlhf.contract.stage import ENV_S3_ACCESS_KEY, ENV_S3_SECRET_KEY, StageLayout
from kuberlhf_operator import LABEL_ATTEMPT, LABEL_COMPONENT, LABEL_PIPELINE, LABEL_STAGE, metrics, wakeups
from kuberlhf_operator.kube import Kube
from kuberlhf_operator.manifests import job_name
from kuberlhf_operator.observe import (
    JobState,
    Observed,
    PodsState,
    failure_detail,
    pod_failure,
    reported_digest,
    summarize_deployment,
    summarize_job,
    summarize_pods,
)
from kuberlhf_operator.reconcile import (
    Decision,
    OperatorConfig,
    PipelineMeta,
    ProbeResult,
    reconcile,
    stages_to_probe,
    storage_spec_for_probe,
    timestamp,
)

log = logging.getLogger("kuberlhf.operator")
# The safety timer: each pipeline is reconciled at least every KUBERLHF_RECONCILE_INTERVAL seconds (more with many
# pipelines, see wakeups.safety_interval); kopf's timer ticks every TIMER_TICK seconds to check who is due.
SAFETY_INTERVAL = float(os.environ.get("KUBERLHF_RECONCILE_INTERVAL", "60"))
TIMER_TICK = min(SAFETY_INTERVAL, float(os.environ.get("KUBERLHF_TIMER_TICK", "5")))
ERROR_RETRY_SECONDS = 10.0
STATUS_CONFLICT_RETRIES = 4


class _State:
    kube: Kube = Kube()
    config: OperatorConfig = OperatorConfig(default_image=os.environ.get("KUBERLHF_DEFAULT_IMAGE") or None)
    locks: dict[tuple[str, str], threading.Lock] = {}
    locks_guard = threading.Lock()
    namespaced: bool = False  # set by main(); namespaced operators skip kopf's namespace scanning
    stores = wakeups.StoreCache()
    schedule = wakeups.Schedule()
    jobs_seen = wakeups.ChangeFilter()
    pods_seen = wakeups.ChangeFilter()
    deployments_seen = wakeups.ChangeFilter()


def configure(kube: Kube | None = None, config: OperatorConfig | None = None, namespaced: bool | None = None) -> None:
    if namespaced is not None:
        _State.namespaced = namespaced
    if kube is not None:
        _State.kube = kube
    if config is not None:
        _State.config = config


def _lock(namespace: str, name: str) -> threading.Lock:
    with _State.locks_guard:
        return _State.locks.setdefault((namespace, name), threading.Lock())


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(ref.get("uid") == uid for ref in (obj.get("metadata") or {}).get("ownerReferences") or [])


def gather(kube: Kube, meta: PipelineMeta, status: dict[str, Any]) -> Observed:
    """Everything the pipeline owns (by label, then by ownerReference uid so a re-created pipeline of the same
    name never adopts the old one's children), plus failure text of failed current-attempt Jobs."""
    selector = f"{LABEL_PIPELINE}={meta.name}"
    jobs = {}
    for raw in kube.list("Job", meta.namespace, selector):
        state = summarize_job(raw) if _owned_by(raw, meta.uid) else None
        if state is not None:
            jobs[state.name] = state
    services = frozenset(s["metadata"]["name"] for s in kube.list("Service", meta.namespace, selector)
                         if _owned_by(s, meta.uid))
    deployments = {d["metadata"]["name"]: summarize_deployment(d)
                   for d in kube.list("Deployment", meta.namespace, selector) if _owned_by(d, meta.uid)}
    stages_st = status.get("stages") or {}

    def current(job: JobState) -> bool:
        st = stages_st.get(job.stage) or {}
        return st.get("phase") not in ("Failed", "Succeeded") and job.attempt >= int(st.get("attempts") or 0)

    # Pods only of the current attempts' Jobs that still run (Pending vs Running) or failed (the failure text).
    wanted = [j for j in jobs.values() if current(j) and not j.deleting and j.phase in ("Running", "Failed")]
    by_job: dict[str, list[dict[str, Any]]] = {j.name: [] for j in wanted}
    if wanted:
        for pod in kube.list("Pod", meta.namespace, f"{selector},{LABEL_COMPONENT}=stage"):
            labels = pod["metadata"].get("labels") or {}
            try:
                name = job_name(meta.name, labels[LABEL_STAGE], int(labels[LABEL_ATTEMPT]))
            except (KeyError, ValueError):
                continue
            if name in by_job:
                by_job[name].append(pod)
    details: dict[str, str] = {}
    pods: dict[str, PodsState] = {}
    for job in wanted:
        if job.phase == "Running":
            pods[job.name] = summarize_pods(by_job[job.name])
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
    return Observed(jobs=jobs, services=services, deployments=deployments, failure_details=details, pods=pods)


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
    pods = kube.list("Pod", meta.namespace, f"{LABEL_PIPELINE}={meta.name},{LABEL_COMPONENT}=stage")
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


def probe(kube: Kube, meta: PipelineMeta, spec: dict[str, Any], status: dict[str, Any],
          observed: Observed) -> dict[str, ProbeResult]:
    """Whether the stages whose Job succeeded committed their output: ``_COMPLETE`` and the manifest digest in
    the object store, read with the pipeline's own secretRef keys; without a secretRef, the stage pods' reports."""
    stages = stages_to_probe(status, observed)
    if not stages:
        return {}
    try:
        storage = StorageSpec.model_validate(storage_spec_for_probe(spec, status))
        layout = StageLayout(storage_uri=storage.uri, namespace=meta.namespace, pipeline=meta.name, uid=meta.uid)
        if storage.secret_ref is None:
            return reported_probes(kube, meta, stages, observed, layout)
        store = _State.stores.get(storage, storage_env(kube, meta.namespace, storage))
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


def apply_actions(kube: Kube, namespace: str, decision: Decision) -> None:
    for action in decision.actions:
        if action.verb == "create":
            if kube.create(action.kind, namespace, action.body):
                log.info("created %s %s/%s", action.kind, namespace, action.name)
        elif action.verb == "patch":
            kube.patch(action.kind, namespace, action.name, action.body)
            log.info("patched %s %s/%s: %s", action.kind, namespace, action.name, action.body)
        elif action.verb == "delete":
            kube.delete(action.kind, namespace, action.name)
            log.info("deleted %s %s/%s", action.kind, namespace, action.name)


def status_patch(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """A merge patch turning ``old`` into ``new`` at the top level (keys that disappeared become null)."""
    patch: dict[str, Any] = {k: None for k in old if k not in new}
    patch.update(new)
    return patch


def post_event(kube: Kube, body: dict[str, Any], type_: str, reason: str, message: str, now: datetime) -> None:
    meta = body["metadata"]
    ts = timestamp(now)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": KIND, "name": meta["name"],
                           "namespace": meta["namespace"], "uid": meta["uid"]},
        "type": type_,
        "reason": reason,
        "message": message[:1024],
        "source": {"component": "kuberlhf-operator"},
        "reportingComponent": "kuberlhf-operator",
        "reportingInstance": socket.gethostname()[:128],
        "firstTimestamp": ts,
        "lastTimestamp": ts,
        "count": 1,
    }
    try:
        kube.create("Event", meta["namespace"], event)
    except ApiException as e:  # an event is best effort; the status carries the same facts
        log.warning("could not post event %s for %s: %s", reason, meta["name"], e.reason)


def reconcile_pipeline(namespace: str, name: str, trigger: str = "manual", kube: Kube | None = None,
                       now: datetime | None = None) -> Decision | None:
    """Read the pipeline fresh, decide, apply children, write status (optimistically), post events."""
    kube = kube or _State.kube
    metrics.RECONCILES.labels(trigger=trigger).inc()
    with _lock(namespace, name):
        for _ in range(STATUS_CONFLICT_RETRIES):
            body = kube.get("RLHFPipeline", namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                metrics.set_phase(namespace, name, None)
                _State.schedule.drop((namespace, name))
                return None
            m = body["metadata"]
            meta = PipelineMeta(name=m["name"], namespace=m["namespace"], uid=m["uid"],
                                generation=int(m.get("generation") or 1))
            spec, status = body.get("spec") or {}, body.get("status") or {}
            observed = gather(kube, meta, status)
            probes = probe(kube, meta, spec, status, observed)
            at = now or datetime.now(timezone.utc)
            decision = reconcile(meta, spec, status, observed, at, probes, _State.config)
            apply_actions(kube, namespace, decision)
            if decision.status != status:
                try:
                    kube.patch("RLHFPipeline", namespace, name, sub="status", body={
                        "metadata": {"resourceVersion": m["resourceVersion"]},
                        "status": status_patch(status, decision.status)})
                except ApiException as e:
                    if e.status == 409:  # someone (kopf's annotations) wrote in between: decide again
                        continue
                    raise
            for ev in decision.events:
                post_event(kube, body, ev.type, ev.reason, ev.message, at)
            for stage, seconds in decision.stage_durations.items():
                metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
            metrics.set_phase(namespace, name, decision.status.get("phase"))
            _State.schedule.set((namespace, name), time.monotonic() + (decision.requeue_after or wakeups.safety_interval(
                len(_State.schedule), SAFETY_INTERVAL)))
            return decision
        raise kopf.TemporaryError(f"status of {namespace}/{name} kept changing; retrying", delay=2)


def _guarded(namespace: str, name: str, trigger: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
    # Until this run succeeds, the timer retries it soon (a failed run leaves no fresh schedule).
    _State.schedule.set((namespace, name), time.monotonic() + ERROR_RETRY_SECONDS)
    try:
        reconcile_pipeline(namespace, name, trigger)
    except kopf.TemporaryError:
        metrics.RECONCILE_ERRORS.labels(kind="conflict").inc()
        raise
    except ApiException as e:
        metrics.RECONCILE_ERRORS.labels(kind="api").inc()
        raise kopf.TemporaryError(f"API error {e.status} {e.reason}: {(e.body or '')[:300]}", delay=5) from e
    except Exception as e:
        metrics.RECONCILE_ERRORS.labels(kind=type(e).__name__).inc()
        logger.exception("reconcile of %s/%s failed", namespace, name)
        raise kopf.TemporaryError(f"{type(e).__name__}: {e}", delay=10) from e


# --- kopf registration ---------------------------------------------------------------------------------------

@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_: Any) -> None:
    # Progress and the last-handled spec live in annotations: status belongs to reconcile alone, and no
    # finalizers are needed (children are owned and garbage-collected with the pipeline).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
    settings.persistence.finalizer = f"{API_GROUP}/kopf-finalizer"
    settings.peering.standalone = True
    if _State.namespaced:
        # The watched namespaces are listed explicitly: scanning would list/watch Namespace objects, which a
        # namespaced install's RBAC does not grant (kopf then retries for about a minute before handling anything).
        settings.scanning.disabled = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.execution.max_workers = int(os.environ.get("KUBERLHF_OPERATOR_WORKERS", "8"))
    override = os.environ.get("KUBERLHF_JOB_SUSPEND", "auto").lower()
    if override in ("true", "false"):
        supported = override == "true"
    else:
        try:
            supported = _State.kube.server_version() >= (1, 22)
        except Exception as e:  # noqa: BLE001
            logger.warning("cannot read the server version (%s); assuming Job suspend works", e)
            supported = True
    _State.config = OperatorConfig(default_image=_State.config.default_image, job_suspend_supported=supported)
    logger.info("kuberlhf operator: default image %s, Job suspend %s", _State.config.default_image,
                "native" if supported else "by deleting the Job (server < 1.22)")


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
def on_create(namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    _guarded(namespace, name, "create", logger)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
def on_resume(namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    _guarded(namespace, name, "resume", logger)


@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
def on_update(namespace: str, name: str, logger: logging.Logger, **_: Any) -> None:
    _guarded(namespace, name, "update", logger)


@kopf.timer(API_GROUP, API_VERSION, PLURAL, interval=TIMER_TICK, initial_delay=TIMER_TICK, idle=None)
def on_timer(namespace: str, name: str, status: dict[str, Any], logger: logging.Logger, **_: Any) -> None:
    if status.get("phase") == "Failed" and status.get("reason") != "InvalidSpec":
        return  # terminal; nothing can change without a spec change (which the update handler sees)
    if not _State.schedule.due((namespace, name), time.monotonic()):
        return  # reconciled recently (events drive progress); the timer is only the safety net
    _guarded(namespace, name, "timer", logger)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def on_pipeline_event(type: str, namespace: str, name: str, **_: Any) -> None:  # noqa: A002 - kopf's kwarg
    if type == "DELETED":
        metrics.set_phase(namespace, name, None)
        _State.schedule.drop((namespace, name))


def _wake_owner(namespace: str, labels: dict[str, str], trigger: str, logger: logging.Logger) -> None:
    owner = labels.get(LABEL_PIPELINE)
    if owner:
        _guarded(namespace, owner, trigger, logger)


def _child_changed(seen: wakeups.ChangeFilter, type_: str | None, uid: str, key: Any, first_matters: bool) -> bool:
    if type_ == "DELETED":
        seen.forget(uid)
        return True
    return seen.changed(uid, key, first_matters=first_matters)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_PIPELINE: kopf.PRESENT})
def on_job_event(type: str, namespace: str, body: kopf.Body, labels: dict[str, str],  # noqa: A002
                 logger: logging.Logger, **_: Any) -> None:
    key = wakeups.job_key(dict(body))
    if _child_changed(_State.jobs_seen, type, body.metadata.uid, key, wakeups.job_first_sight_matters(key)):
        _wake_owner(namespace, labels, "job", logger)


@kopf.on.event("", "v1", "pods", labels={LABEL_PIPELINE: kopf.PRESENT, LABEL_COMPONENT: "stage"})
def on_pod_event(type: str, namespace: str, body: kopf.Body, labels: dict[str, str],  # noqa: A002
                 logger: logging.Logger, **_: Any) -> None:
    if type == "DELETED":
        # A running pod gone (evicted, preempted) may leave its Job waiting for a replacement: look again. Other
        # deletions (finished pods, the pipeline's garbage collection) are told by the Job's own events.
        last = _State.pods_seen.forget(body.metadata.uid)
        if last is not None and last[0] == "Running":  # type: ignore[index]
            _wake_owner(namespace, labels, "pod", logger)
        return
    key = wakeups.pod_key(dict(body))
    if _State.pods_seen.changed(body.metadata.uid, key, first_matters=wakeups.pod_first_sight_matters(key)):
        _wake_owner(namespace, labels, "pod", logger)


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_PIPELINE: kopf.PRESENT})
def on_deployment_event(type: str, namespace: str, body: kopf.Body, labels: dict[str, str],  # noqa: A002
                        logger: logging.Logger, **_: Any) -> None:
    key = wakeups.deployment_key(dict(body))
    if _child_changed(_State.deployments_seen, type, body.metadata.uid, key,
                      wakeups.deployment_first_sight_matters(key)):
        _wake_owner(namespace, labels, "deployment", logger)
