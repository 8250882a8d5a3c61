"""Pure summaries of the children the API server reports (Jobs, Deployments, Pods): what reconcile reads.

The handlers list raw objects; these functions reduce them to small frozen records so that the reconcile
function is tested with plain values and never sees API-client types."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from kuberlhf.contract.pod import TRAINER_CONTAINER
from kuberlhf.contract.stage import ENV_PIPELINE, EXIT_INTERRUPTED, EXIT_USER_ERROR
from kuberlhf_operator import LABEL_ATTEMPT, LABEL_STAGE
from kuberlhf_operator.manifests import job_held

JobPhase = Literal["Running", "Succeeded", "Failed"]
# Why a stage Job failed, from its failed pods (classify_failure): the user's configuration (never retried), a
# disruption of the pod (preemption, eviction, drain: retried without using up an attempt), or anything else.
FailureKind = Literal["user_error", "disruption", "failure"]
# Pod status reasons of a kubelet that ended a pod for the node's sake, not the pod's (node-pressure eviction,
# graceful node shutdown, preemption by a critical pod); servers before 1.26 set no DisruptionTarget condition.
DISRUPTED_POD_REASONS = frozenset({"Evicted", "Preempting", "Shutdown", "NodeShutdown", "Terminated"})
FAILURE_TAIL_LINES = 20
FAILURE_TAIL_CHARS = 2000
# Waiting reasons every pod passes through on its way to Running: shown in status, but not worth an Event.
ROUTINE_WAITING = frozenset({"ContainerCreating", "PodInitializing", "PodScheduling"})


@dataclass(frozen=True)
class JobState:
    name: str
    stage: str
    attempt: int
    phase: JobPhase = "Running"
    suspended: bool = False
    deleting: bool = False
    start_time: str | None = None
    completion_time: str | None = None
    failure: str | None = None  # the Job's Failed condition (reason: message)
    # The resolved spec this attempt runs with (its trainer's KUBERLHF_PIPELINE, as JSON text): a Job's pod
    # template is immutable, so this is the record of what the stage runs; retries resume it (reconcile.Snapshot).
    pipeline: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class DeploymentState:
    name: str
    replicas: int = 1
    ready_replicas: int = 0
    deleting: bool = False

    @property
    def available(self) -> bool:
        return self.ready_replicas >= min(self.replicas, 1)


@dataclass(frozen=True)
class PodsState:
    """The pods of one Job: how many run (or ran), else why the first waiting one waits."""

    total: int = 0
    running: int = 0  # phase Running or Succeeded: the stage process has started
    reason: str | None = None  # Unschedulable, ImagePullBackOff, ContainerCreating, ...
    message: str = ""

    @property
    def routine(self) -> bool:
        """Waiting only the way every pod waits for a moment (nothing a user has to act on)."""
        return self.reason is None or self.reason in ROUTINE_WAITING


@dataclass(frozen=True)
class Observed:
    """Everything the pipeline owns, as last listed. ``failure_details`` maps a Job name to its failed pod's
    termination message or log tail (the handler reads logs only for failed Jobs); ``pods`` summarises the
    pods of the Jobs still active (a Job missing there has no pods yet)."""

    jobs: dict[str, JobState] = field(default_factory=dict)
    services: frozenset[str] = frozenset()
    deployments: dict[str, DeploymentState] = field(default_factory=dict)
    failure_details: dict[str, str] = field(default_factory=dict)
    pods: dict[str, PodsState] = field(default_factory=dict)
    network_policies: frozenset[str] = frozenset()
    failure_kinds: dict[str, FailureKind] = field(default_factory=dict)  # failed Jobs -> classify_failure
    # Jobs without pods -> why the Job controller cannot create them (its newest FailedCreate event: a quota, the
    # namespace's Pod Security level, a missing ServiceAccount, an admission webhook), see create_refusal
    create_refusals: dict[str, str] = field(default_factory=dict)


def _cond(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == ctype and c.get("status") == "True":
            return c
    return None


def job_pipeline(job: dict[str, Any]) -> str | None:
    """The KUBERLHF_PIPELINE text of a stage Job's trainer container (None when absent)."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in pod.get("containers") or []:
        if container.get("name") == TRAINER_CONTAINER:
            return next((e.get("value") for e in container.get("env") or [] if e.get("name") == ENV_PIPELINE), None)
    return None


def summarize_job(job: dict[str, Any]) -> JobState | None:
    """A raw batch/v1 Job -> JobState; None for a Job without the operator's stage/attempt labels."""
    meta = job.get("metadata") or {}
    labels = meta.get("labels") or {}
    try:
        stage, attempt = labels[LABEL_STAGE], int(labels[LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return None
    spec, status = job.get("spec") or {}, job.get("status") or {}
    completions = int(spec.get("completions") or 1)
    phase: JobPhase = "Running"
    failure = None
    failed_cond = _cond(job, "Failed")
    if _cond(job, "Complete") or int(status.get("succeeded") or 0) >= completions:
        phase = "Succeeded"
    elif failed_cond is not None:
        phase = "Failed"
        failure = f"{failed_cond.get('reason', 'Failed')}: {failed_cond.get('message', '')}".rstrip(": ")
    elif int(status.get("failed") or 0) > int(spec.get("backoffLimit") or 0):
        # The controller sets the Failed condition a moment later; backoffLimit is 0, so one failure decides.
        phase = "Failed"
        failure = f"{status.get('failed')} pod(s) failed"
    return JobState(
        name=meta.get("name", ""),
        stage=stage,
        attempt=attempt,
        phase=phase,
        suspended=job_held(spec),
        deleting=bool(meta.get("deletionTimestamp")),
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
        failure=failure,
        pipeline=job_pipeline(job),
    )


def pod_waiting(pod: dict[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a pod that does not run yet; None once it runs or ran. The scheduler's verdict
    (PodScheduled=False) comes first, then a container's waiting reason that is not routine (ImagePullBackOff,
    CreateContainerConfigError, ...), then the routine ones."""
    status = pod.get("status") or {}
    if (status.get("phase") or "Pending") != "Pending":
        return None
    name = (pod.get("metadata") or {}).get("name", "?")
    sched = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
    if sched is not None and sched.get("status") == "False":
        reason = sched.get("reason") or "Unschedulable"
        return reason, f"pod {name} cannot be scheduled: {sched.get('message') or reason}"
    routine = None
    for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting")
        if not waiting:
            continue
        reason = waiting.get("reason") or "ContainerCreating"
        text = f"pod {name} container {cs.get('name', '?')}: {reason}"
        if waiting.get("message"):
            text += f": {waiting['message']}"
        if reason not in ROUTINE_WAITING:
            return reason, text
        routine = routine or (reason, text)
    if routine:
        return routine
    if not (pod.get("spec") or {}).get("nodeName"):
        return "PodScheduling", f"pod {name} waits to be scheduled"
    return "ContainerCreating", f"pod {name} is starting"


def summarize_pods(pods: list[dict[str, Any]]) -> PodsState:
    """The pods of one Job -> PodsState (the most telling waiting reason wins: a non-routine one first)."""
    running, waits = 0, []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        if (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Running", "Succeeded"):
            running += 1
        wait = pod_waiting(pod)
        if wait is not None:
            waits.append(wait)
    waits.sort(key=lambda w: w[0] in ROUTINE_WAITING)  # stable: non-routine first, then by pod name
    reason, message = waits[0] if waits else (None, "")
    return PodsState(total=running + len(waits), running=running, reason=reason, message=message)


def create_refusal(events: list[dict[str, Any]]) -> str | None:
    """The API server's answer to the Job controller's newest failed pod creation (the message of its newest
    ``FailedCreate`` Event on the Job, e.g. 'Error creating: pods "x" is forbidden: exceeded quota: ...'); None
    when there is none."""
    failed = [e for e in events if e.get("reason") == "FailedCreate" and e.get("message")]
    if not failed:
        return None
    newest = max(failed, key=lambda e: (e.get("lastTimestamp") or e.get("eventTime") or "", int(e.get("count") or 1)))
    return str(newest["message"])


def summarize_deployment(dep: dict[str, Any]) -> DeploymentState:
    meta, spec, status = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    replicas = spec.get("replicas")
    return DeploymentState(
        name=meta.get("name", ""),
        replicas=1 if replicas is None else int(replicas),
        ready_replicas=int(status.get("readyReplicas") or 0),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def tail(text: str, lines: int = FAILURE_TAIL_LINES, chars: int = FAILURE_TAIL_CHARS) -> str:
    out = "\n".join(text.rstrip().splitlines()[-lines:])
    return out[-chars:]


def pod_failure(pod: dict[str, Any]) -> tuple[str | None, bool]:
    """(summary of a failed pod, whether its termination message was empty so the caller should read the log).
    Returns (None, False) for a pod that did not fail."""
    status = pod.get("status") or {}
    name = (pod.get("metadata") or {}).get("name", "?")
    terminated = [
        (cs.get("name", "?"), (cs.get("state") or {}).get("terminated") or {})
        for cs in status.get("containerStatuses") or []
    ]
    failed = [(c, t) for c, t in terminated if t and int(t.get("exitCode") or 0) != 0]
    if status.get("phase") != "Failed" and not failed:
        return None, False
    if not failed:
        reason = status.get("reason") or "Failed"
        msg = status.get("message") or ""
        return f"pod {name}: {reason} {msg}".rstrip(), not msg
    container, term = failed[0]
    head = f"pod {name} container {container} exited with code {term.get('exitCode')} ({term.get('reason', 'Error')})"
    message = term.get("message") or ""
    if message:
        return f"{head}:\n{tail(message)}", False
    return head, True


def _trainer_exit_code(pod: dict[str, Any]) -> int | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == TRAINER_CONTAINER:
            term = (cs.get("state") or {}).get("terminated")
            return int(term.get("exitCode") or 0) if term else None
    return None


def disrupted(pod: dict[str, Any]) -> bool:
    """The pod was stopped for the cluster's sake: a DisruptionTarget condition (1.26+: preemption, eviction, node
    drain or shutdown), a kubelet's eviction/shutdown reason, or the stage's own SIGTERM exit (it committed a
    checkpoint: EXIT_INTERRUPTED), which on older servers is the only sign of a preemption."""
    status = pod.get("status") or {}
    if any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or []):
        return True
    return status.get("reason") in DISRUPTED_POD_REASONS or _trainer_exit_code(pod) == EXIT_INTERRUPTED


def classify_failure(pods: list[dict[str, Any]]) -> FailureKind:
    """Why the pods of a failed Job failed: ``user_error`` if a trainer exited with the user-error code (retrying
    cannot help), else ``disruption`` if every failed pod was disrupted (a rank the Job controller stopped after
    another rank failed is not the cause), else ``failure``."""
    failed = [p for p in pods if pod_failure(p)[0] is not None]
    if any(_trainer_exit_code(p) == EXIT_USER_ERROR for p in failed):
        return "user_error"
    if failed and all(disrupted(p) for p in failed):
        return "disruption"
    return "failure"


def failure_detail(pods: list[dict[str, Any]], logs: dict[str, str] | None = None) -> str | None:
    """The failure text of a Job from its pods: the first failed pod's termination message, else its log tail
    (``logs`` maps pod name -> log text the handler read)."""
    logs = logs or {}
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        summary, wants_log = pod_failure(pod)
        if summary is None:
            continue
        name = (pod.get("metadata") or {}).get("name", "")
        if wants_log and logs.get(name):
            return f"{summary}; last log lines:\n{tail(logs[name])}"
        return summary
    return None


def reported_digest(pods: list[dict[str, Any]], stage: str, checkpoint_uri: str) -> str | None:
    """The manifest sha256 the pods of a succeeded stage Job say they committed at ``checkpoint_uri``: the
    termination message rank 0 writes (``kuberlhf.stages.runtime.completion_report``). None when no pod reports
    that prefix. Used when the operator may not read the bucket itself (no ``spec.storage.secretRef``: the stage
    pods write with their workload identity); the report is as trustworthy as the pipeline's own image."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            if cs.get("name") != TRAINER_CONTAINER:
                continue  # a user's sidecar (spec.podTemplate) does not speak for the stage
            term = (cs.get("state") or {}).get("terminated") or {}
            if int(term.get("exitCode") or 0) != 0 or not term.get("message"):
                continue
            try:
                report = json.loads(term["message"]).get("kuberlhf") or {}
            except (ValueError, AttributeError):
                continue
            digest = str(report.get("manifestSha256") or "")
            if (report.get("stage") == stage and report.get("checkpoint") == checkpoint_uri
                    and len(digest) == 64 and all(ch in "0123456789abcdef" for ch in digest)):
                return digest
    return None
