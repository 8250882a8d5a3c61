"""The pure reconcile function: (pipeline, status, observed children, now, checkpoint probes) -> Decision.

No I/O here. ``controller.Operator`` gathers ``Observed`` (``cluster``: Jobs, Services, the chat Deployment,
failed pods' messages) and the checkpoint probes (``storage_probe``: does ``<stage>/_COMPLETE`` exist, manifest
digest), calls :func:`reconcile`, then applies the decision in one place (``writes``: the child actions, one status
patch, the events). Calling it twice with the same inputs gives the same decision, and children are named
deterministically, so an operator restart at any moment never makes a second Job for the same attempt.

The pure parts, in order:

1. the spec snapshot (:class:`Snapshot`): the object's ``spec`` validated once, the preflight, the install policy
   and the storage transition rule; a failure is ``InvalidSpec`` before any child exists. Started stages read
   their settings from their own Jobs, never from status;
2. the stage state machine (``_Run``): the new status and the child actions (create/patch/delete);
3. the Events, derived once from the old and the new status (:func:`transition_events`), so "only on a
   transition" lives in one function.

State machine (status.phase / status.stage):
Pending -> Running/sft -> Running/reward -> Running/ppo -> Running/serving -> Succeeded/done (the stages of
spec.algorithm's graph: sft -> reward -> ppo, sft -> dpo, sft -> [reward ->] grpo), with Suspended
(spec.suspend), Queued (a stage Job a queue such as Kueue has not admitted) and Failed (attempts exhausted, or
InvalidSpec until the spec is fixed) on the side.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import ValidationError

from kuberlhf.contract.preflight import format_problems, preflight
from kuberlhf.contract.rules import update_problems
from kuberlhf.contract.spec import (
    ALL_STAGES,
    ObjectMeta,
    PipelineSpec,
    RLHFPipeline,
    SpecError,
    Stage,
    graph_text,
    parse_pipeline,
    parse_spec,
    written_spec,
)
from kuberlhf.contract.stage import EXIT_USER_ERROR, StageLayout
from kuberlhf_operator import LABEL_STAGE
from kuberlhf_operator.manifests import (
    QUEUE_NAME_LABEL,
    Owner,
    api_key_secret_name,
    build_chat_api_key_secret,
    build_chat_deployment,
    build_chat_disruption_budget,
    build_chat_network_policy,
    build_chat_service,
    build_stage_job,
    build_stage_network_policy,
    build_stage_service,
    chat_endpoint,
    chat_name,
    generated_api_key_secret_name,
    job_name,
    propagated_labels,
)
from kuberlhf_operator.observe import ROUTINE_WAITING, JobState, Observed, PodsState
from kuberlhf_operator.spec_pin import SERVING, changed_since_pin, pin

DONE = "done"
CONDITION_OF_STAGE = {"sft": "SFTSucceeded", "reward": "RewardSucceeded", "ppo": "PPOSucceeded",
                      "dpo": "DPOSucceeded", "grpo": "GRPOSucceeded"}
STAGE_TITLE = {"sft": "SFT", "reward": "reward model", "ppo": "PPO", "dpo": "DPO", "grpo": "GRPO"}
REASON_INVALID_SPEC = "InvalidSpec"
REASON_CONFIG_ERROR = "ConfigError"  # a stage exited with the user-error code
REASON_CREATE_REFUSED = "CreateRefused"  # the API server refused a child for a reason that may pass (a quota)
REQUEUE_SECONDS = 10.0
_SAME_WAITING = {"ErrImagePull": "ImagePullBackOff"}


@dataclass(frozen=True)
class PipelineMeta:
    name: str
    namespace: str
    uid: str
    generation: int = 1
    labels: dict[str, str] = field(default_factory=dict, hash=False)  # the pipeline's (queue names: Kueue)


@dataclass(frozen=True)
class ProbeResult:
    """What the handler found in the object store for a stage whose Job succeeded."""

    complete: bool
    checkpoint: str = ""
    manifest_sha256: str | None = None
    error: str | None = None  # the store could not be asked (unreachable, auth): decide nothing, retry


@dataclass(frozen=True)
class OperatorConfig:
    default_image: str | None = None
    # Job.spec.suspend exists from Kubernetes 1.22 (beta, on by default). Older servers drop the field, so there
    # spec.suspend deletes the running Job instead (the next attempt resumes from its checkpoint), and a queued
    # stage's Job is held at parallelism 0 until admitted (manifests.build_stage_job).
    job_suspend_supported: bool = True
    # Job.spec.podFailurePolicy: beta and on by default from 1.26; older servers get no such field (the operator
    # classifies failed pods itself either way, observe.classify_failure).
    pod_failure_policy_supported: bool = True
    # The operator's own ServiceAccount (namespace, name): no pipeline's pods may run as it.
    operator_service_account: tuple[str, str] | None = None
    # Install-wide policy (the chart's policy.*): image globs and ServiceAccount names pods may use; empty = any.
    allowed_images: tuple[str, ...] = ()
    allowed_service_accounts: tuple[str, ...] = ()
    # PodDisruptionBudget is policy/v1 from Kubernetes 1.21; older servers have policy/v1beta1 only.
    pdb_api_version: str = "policy/v1"
    # The restricted-profile securityContext on every pod (the chart's policy.hardenedPods; false = none at all).
    hardened_pods: bool = True


def config_from_env(env: Mapping[str, str]) -> OperatorConfig:
    """What the chart passes the operator: KUBERLHF_DEFAULT_IMAGE, POD_NAMESPACE + KUBERLHF_SERVICE_ACCOUNT and
    the comma-separated KUBERLHF_ALLOWED_IMAGES / KUBERLHF_ALLOWED_SERVICE_ACCOUNTS, KUBERLHF_HARDENED_PODS."""
    def items(key: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in (env.get(key) or "").split(",") if x.strip())

    sa, ns = env.get("KUBERLHF_SERVICE_ACCOUNT"), env.get("POD_NAMESPACE")
    return OperatorConfig(default_image=env.get("KUBERLHF_DEFAULT_IMAGE") or None,
                          operator_service_account=(ns, sa) if sa and ns else None,
                          allowed_images=items("KUBERLHF_ALLOWED_IMAGES"),
                          allowed_service_accounts=items("KUBERLHF_ALLOWED_SERVICE_ACCOUNTS"),
                          hardened_pods=(env.get("KUBERLHF_HARDENED_PODS") or "true").lower() != "false")


def secret_references(node: Any, at: str = "spec") -> list[tuple[str, str]]:
    """(field, Secret name) of every Secret a spec refers to: ``*secretRef`` / ``secretKeyRef`` objects (storage,
    HF token, API key, env, envFrom), volumes' ``secret.secretName`` and projected ``secret`` sources."""
    out: list[tuple[str, str]] = []
    if isinstance(node, list):
        for i, item in enumerate(node):
            out += secret_references(item, f"{at}[{i}]")
    elif isinstance(node, dict):
        for key, value in node.items():
            path = f"{at}.{key}"
            if key == "secretName" and isinstance(value, str):
                out.append((path, value))
            elif (key == "secret" or key.lower().endswith(("secretref", "secretkeyref"))) and isinstance(value, dict):
                if isinstance(value.get("name"), str):
                    out.append((f"{path}.name", value["name"]))
                out += secret_references({k: v for k, v in value.items() if k != "name"}, path)
            else:
                out += secret_references(value, path)
    return out


def pod_policy_problem(namespace: str, spec: PipelineSpec, config: OperatorConfig) -> str | None:
    """The first field that would run a pod as the operator (its ServiceAccount, or in the operator's own namespace
    the token Secret the token controller made for it), or outside the install's allowlists."""
    if config.operator_service_account and config.operator_service_account[0] == namespace:
        sa = config.operator_service_account[1]
        for at, name in secret_references(spec.to_wire()):
            # <1.24 (and any cluster that still has them): the ServiceAccount's token Secret is <sa>-token-<5 chars>
            if name.startswith(f"{sa}-token-"):
                return (f"{at}: Secret {name!r} holds the kuberlhf operator's ServiceAccount token; a pipeline's pods "
                        "may not read it (run pipelines in a namespace other than the operator's)")
    layers: list[tuple[str, Any]] = [("spec.podTemplate", spec.pod_template)]
    layers += [(f"spec.stages.{st.value}.podTemplate", spec.stages.get(st).pod_template) for st in ALL_STAGES]
    layers.append(("spec.serving.podTemplate", spec.serving.pod_template))
    image = spec.image or config.default_image
    images = [("spec.image", image)] if image else []
    for at, template in layers:
        if template is None:
            continue
        pod = template.to_wire().get("spec") or {}
        for key in ("serviceAccountName", "serviceAccount"):  # serviceAccount: PodSpec's deprecated alias
            sa = pod.get(key)
            if not sa:
                continue
            if config.operator_service_account == (namespace, sa):
                return (f"{at}.spec.{key}: {sa!r} is the kuberlhf operator's own ServiceAccount; a pipeline's "
                        "pods may not act as the operator (name a ServiceAccount of your own, or none)")
            if config.allowed_service_accounts and sa not in config.allowed_service_accounts:
                return (f"{at}.spec.{key}: ServiceAccount {sa!r} is not in this install's allowlist "
                        f"({', '.join(config.allowed_service_accounts)}; chart value policy.allowedServiceAccounts)")
        for kind in ("initContainers", "containers"):
            images += [(f"{at}.spec.{kind}[{c.get('name')}].image", c["image"])
                       for c in pod.get(kind) or [] if c.get("image")]
    if config.allowed_images:
        for at, img in images:
            if not any(fnmatch.fnmatchcase(img, pattern) for pattern in config.allowed_images):
                return (f"{at}: image {img!r} is not in this install's allowlist "
                        f"({', '.join(config.allowed_images)}; chart value policy.allowedImages)")
    return None


@dataclass(frozen=True)
class Action:
    verb: Literal["create", "patch", "delete"]
    kind: str  # Job | Service | Deployment
    name: str
    body: dict[str, Any] = field(default_factory=dict)  # the object (create) or a merge patch (patch)


# The API server refuses an Event whose message is longer, in bytes (422), and kopf then drops it silently: a failed stage's
# message carries the pod's log tail, which is how StageRetrying used to vanish.
EVENT_MESSAGE_LIMIT = 1024


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str

    def __post_init__(self) -> None:
        # The limit counts UTF-8 bytes (Go's len), and a log tail is full of tqdm's 3-byte block characters.
        raw = self.message.encode()
        if len(raw) > EVENT_MESSAGE_LIMIT:
            # keep the head (what failed) and the end (the log's last lines), marked as cut
            head = raw[:600].decode(errors="ignore")
            tail = raw[-(EVENT_MESSAGE_LIMIT - 600 - 5):].decode(errors="ignore")
            object.__setattr__(self, "message", f"{head} ... {tail}")


@dataclass
class Decision:
    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None
    stage_durations: dict[str, float] = field(default_factory=dict)  # stages that succeeded in this decision


def timestamp(now: datetime) -> str:
    return now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def set_condition(
    status: dict[str, Any], ctype: str, value: bool | None, reason: str, message: str, now: datetime, generation: int
) -> None:
    """Upsert a condition per API conventions; lastTransitionTime changes only when status changes."""
    text = "Unknown" if value is None else ("True" if value else "False")
    conds: list[dict[str, Any]] = status.setdefault("conditions", [])
    for c in conds:
        if c.get("type") == ctype:
            if c.get("status") != text:
                c["lastTransitionTime"] = timestamp(now)
            c.update(status=text, reason=reason, message=message, observedGeneration=generation)
            return
    conds.append({"type": ctype, "status": text, "reason": reason, "message": message,
                  "lastTransitionTime": timestamp(now), "observedGeneration": generation})


def get_condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions") or [] if c.get("type") == ctype), None)


# --- events: derived once, from the old and the new status ----------------------------------------------------

# Top-level reasons a Pending pipeline can carry that are not a pod's waiting reason worth an Event.
_NOT_A_WAIT = frozenset({"StageStarted", "StageRetrying", "StageDisrupted", "Resumed", "SpecValid", "PodsPending", "StageRunning",
                         "Suspended", "WaitingForQuota", REASON_INVALID_SPEC}) | ROUTINE_WAITING


def _stage_events(stage: str, old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    o, n = (old.get("stages") or {}).get(stage) or {}, (new.get("stages") or {}).get(stage) or {}
    out: list[Event] = []
    here, was_here = new.get("stage") == stage, old.get("stage") == stage
    if here and old.get("phase") == "Suspended" and new.get("phase") != "Suspended":
        out.append(Event("Normal", "Resumed", f"spec.suspend is false: stage {stage} resumes"))
    before, after = int(o.get("attempts") or 0), int(n.get("attempts") or 0)
    if after > before:
        created = (new["message"] if here and new.get("reason") in ("StageStarted", "StageRetrying", "StageDisrupted")
                   else f"stage {stage} attempt {after}: created Job {n.get('jobName')}")  # adopted, not created
        if after == 1:
            out.append(Event("Normal", "StageStarted", created))
        else:
            why = f": {n['message']}" if n.get("message") else ""
            # a disruption (preemption, eviction, drain) is retried without using up an attempt
            disrupted = int(n.get("disruptions") or 0) > int(o.get("disruptions") or 0)
            what = ("was disrupted (preemption, eviction or drain; not counted against backoffLimit)" if disrupted
                    else "failed")
            out.append(Event("Warning", "StageDisrupted" if disrupted else "StageRetrying",
                             f"stage {stage} attempt {after - 1} {what}{why}; retrying, {created} (resumes from the "
                             "newest checkpoint)"))
    phase, reason = new.get("phase"), new.get("reason")
    if here and phase == "Suspended" and old.get("phase") != "Suspended":
        out.append(Event("Normal", "Suspended", new.get("message", "")))
    if here and phase == "Queued" and old.get("phase") != "Queued":
        out.append(Event("Normal", "Queued", new.get("message", "")))
    # One Event per waiting episode and reason (the status message follows every change).
    if here and phase == "Pending" and reason not in _NOT_A_WAIT and (
            reason != old.get("reason") or o.get("phase") != "Pending" or not was_here):
        out.append(Event("Warning", str(reason), new.get("message", "")))
    running, was_running = ("Running", "Running"), was_here and (o.get("phase"), old.get("phase"))
    if here and (n.get("phase"), phase) == running and was_running != running:
        out.append(Event("Normal", "StageRunning", new.get("message", "")))
    if n.get("phase") == "Succeeded" and o.get("phase") != "Succeeded":
        out.append(Event("Normal", "StageSucceeded", f"stage {stage} succeeded: {n.get('checkpoint')} "
                                                     f"(manifest sha256 {str(n.get('manifestSha256'))[:12]})"))
    if n.get("phase") == "Failed" and o.get("phase") != "Failed":
        out.append(Event("Warning", "StageFailed", new.get("message", "")))
    return out


def transition_events(old: dict[str, Any], new: dict[str, Any]) -> list[Event]:
    """The Events of one decision, from the status it started from and the one it ends with: one per transition
    (a stage started, retried, running, waiting for a new reason, succeeded, failed; suspended, resumed, queued;
    an invalid spec or an ignored edit reported for the first time), never for a state that merely persists.
    Deriving them here, not where the state changes, keeps "only on a transition" in one place, and makes a
    decision redone after a lost status write (which only adopts the children it finds) tell the same story."""
    out: list[Event] = []
    for reason in (REASON_INVALID_SPEC, REASON_CREATE_REFUSED):
        if new.get("reason") == reason:
            if (old.get("reason"), old.get("message")) != (reason, new.get("message")):
                out.append(Event("Warning", reason, new.get("message", "")))
            return out
    ignored, was = get_condition(new, "SpecChangeIgnored"), get_condition(old, "SpecChangeIgnored") or {}
    if ignored and ignored.get("status") == "True" and (was.get("status"), was.get("message")) != (
            "True", ignored.get("message")):
        out.append(Event("Warning", "SpecChangeIgnored", ignored.get("message", "")))
    for stage in ALL_STAGES:
        out += _stage_events(stage.value, old, new)
    serving, served = ((new.get("stages") or {}).get(SERVING) or {}), ((old.get("stages") or {}).get(SERVING) or {})
    auth_off, was_off = get_condition(new, "AuthDisabled"), get_condition(old, "AuthDisabled") or {}
    if auth_off and auth_off.get("status") == "True" and was_off.get("status") != "True":
        out.append(Event("Warning", "AuthDisabled", auth_off.get("message", "")))
    if serving.get("jobName") and not served.get("jobName"):
        out.append(Event("Normal", "ServingStarted", f"creating chat Deployment {serving['jobName']}"))
    if new.get("phase") == "Succeeded" and old.get("phase") != "Succeeded":
        out.append(Event("Normal", "Succeeded", f"pipeline succeeded: {new.get('message', '')}"))
    return out


class Snapshot:
    """The spec side of one decision, read once.

    ``current`` is the object's ``spec`` at ``metadata.generation``, validated once (models, presets, preflight):
    every stage that has not started is built from it. A stage that started keeps the spec it started with, and the
    record of that is the stage's newest Job: a Job's pod template is immutable, so its ``KUBERLHF_PIPELINE`` is
    exactly what the attempt runs. A retry, or a Job re-created after a deletion, resumes the same run from its
    checkpoint, so it takes that record (ZeRO partitioning, world size, LoRA shapes and the recipe must match the
    checkpoint), and an edit of a started stage is reported as ``SpecChangeIgnored`` instead. Serving keeps the EMA
    choice PPO ran with. ``spec.storage`` may not change once started: the operator refuses the edit with the CRD
    transition rule's message (a current API server refuses it on write). Status holds facts and the pin's digest
    (``spec_pin``), never configuration: a stage whose Jobs are all gone is rebuilt from the current spec."""

    def __init__(self, meta: PipelineMeta, current: RLHFPipeline, written: dict[str, Any],
                 jobs: Mapping[str, JobState]) -> None:
        self.meta, self.current, self.written, self._jobs = meta, current, written, jobs
        self._parsed: dict[str, RLHFPipeline | None] = {}  # Job name -> its record (parsed at most once)

    def record(self, stage: str) -> RLHFPipeline | None:
        """The spec the newest Job of ``stage`` runs with; None when no Job of it exists (or its record does not
        parse under this release, e.g. a field since removed)."""
        jobs = [j for j in self._jobs.values() if j.stage == stage and j.pipeline]
        if not jobs:
            return None
        newest = max(jobs, key=lambda j: j.attempt)
        if newest.name not in self._parsed:
            try:
                self._parsed[newest.name] = parse_pipeline(newest.pipeline or "")
            except SpecError:
                self._parsed[newest.name] = None
        return self._parsed[newest.name]

    def for_stage(self, stage: str) -> RLHFPipeline:
        return self.record(stage) or self.current

    @property
    def graph(self) -> tuple[Stage, ...]:
        """The stages the pipeline runs: those of the spec its first stage's Job runs with (spec.algorithm and
        stages.grpo.rewardFunction are pinned like every field a started stage depends on), else the current
        spec's."""
        return self.for_stage(Stage.sft.value).spec.stage_graph

    def for_serving(self) -> RLHFPipeline:
        last = self.graph[-1].value  # serving keeps the EMA choice of the final stage it serves
        ran = self.record(last) if last in ("ppo", "grpo") else None
        if ran is None:
            return self.current
        spec = self.current.spec
        stages = spec.stages.model_copy(update={last: ran.spec.stages.get(last)})
        return self.current.model_copy(update={"spec": spec.model_copy(update={"stages": stages})})

    def storage_problem(self, status: dict[str, Any]) -> str | None:
        """The CRD transition rule on storage, judged against the storage the started stages' Jobs use."""
        for stage in reversed(ALL_STAGES):
            old = self.record(stage.value)
            if old is not None:
                new = {"spec": self.current.spec.to_wire()}
                broken = update_problems(new, {"spec": old.spec.to_wire(), "status": status})
                return broken[0].text if broken else None
        return None


def _pipeline(meta: PipelineMeta, wire: dict[str, Any]) -> RLHFPipeline:
    return RLHFPipeline(metadata=ObjectMeta(name=meta.name, namespace=meta.namespace, uid=meta.uid),
                        spec=parse_spec(wire))


class _Run:
    """Mutable state of one reconcile call (keeps the steps small)."""

    def __init__(self, meta: PipelineMeta, status: dict[str, Any], observed: Observed, now: datetime,
                 probes: dict[str, ProbeResult], config: OperatorConfig) -> None:
        self.meta, self.observed, self.now, self.probes, self.config = meta, observed, now, probes, config
        self.snap: Snapshot | None = None  # set once the spec validated
        self.old = status or {}
        self.status = copy.deepcopy(self.old)
        self.owner = Owner(meta.name, meta.namespace, meta.uid)
        self.workload_labels = propagated_labels(meta.labels)
        # A queue (Kueue) admits the stage Jobs: they are created suspended and only the queue unsuspends them.
        self.queue = self.workload_labels.get(QUEUE_NAME_LABEL)
        self.actions: list[Action] = []
        self.requeue: float | None = None
        self.durations: dict[str, float] = {}

    # --- helpers -----------------------------------------------------------------------------------------
    def cond(self, ctype: str, value: bool | None, reason: str, message: str) -> None:
        set_condition(self.status, ctype, value, reason, message, self.now, self.meta.generation)

    def create(self, obj: dict[str, Any]) -> None:
        kind, name = obj["kind"], obj["metadata"]["name"]
        present = {"Job": set(self.observed.jobs), "Service": self.observed.services,
                   "Deployment": set(self.observed.deployments),
                   "NetworkPolicy": self.observed.network_policies}[kind]
        if name not in present:
            self.actions.append(Action("create", kind, name, obj))

    def create_once(self, record: dict[str, Any], obj: dict[str, Any]) -> None:
        """Create a child the operator does not list (a Secret, a PodDisruptionBudget): once, recorded in
        ``record["created"]``; a repeat after a lost status write is a harmless 409."""
        made: list[str] = record.setdefault("created", [])
        key = f"{obj['kind']}/{obj['metadata']['name']}"
        if key not in made:
            self.actions.append(Action("create", obj["kind"], obj["metadata"]["name"], obj))
            made.append(key)

    def decision(self) -> Decision:
        # Every condition was (re)evaluated against this generation's spec.
        for c in self.status.get("conditions") or []:
            c["observedGeneration"] = self.meta.generation
        return Decision(self.status, self.actions, transition_events(self.old, self.status), self.requeue,
                        self.durations)

    # --- phases ----------------------------------------------------------------------------------------------
    def invalid(self, error: str) -> Decision:
        self.status.update(phase="Failed", reason=REASON_INVALID_SPEC, message=error)
        self.status.setdefault("stage", Stage.sft.value)
        self.cond("Failed", True, REASON_INVALID_SPEC, error)
        self.cond("Ready", False, REASON_INVALID_SPEC, "the spec does not validate; fix it and the pipeline goes on")
        return self.decision()

    def report_spec_changes(self) -> None:
        snap = self.spec
        stages_st = self.status.get("stages") or {}
        started = [s for s in [x.value for x in ALL_STAGES] + [SERVING] if (stages_st.get(s) or {}).get("specHash")]
        changes: dict[str, list[str]] = {}
        current = snap.current.spec.to_wire()
        for s in started:
            record = None if s == SERVING else snap.record(s)
            applied = record.spec.to_wire() if record is not None else None
            found = changed_since_pin(stages_st[s], snap.written, current, s, applied)
            for f in found:
                changes.setdefault(f, []).append(s)
            if not found and not stages_st[s].get("presetVersion"):
                stages_st[s].update(pin(snap.written, s))  # a record of an earlier release: re-pin it
        previous = get_condition(self.status, "SpecChangeIgnored")
        if not changes:
            if previous is not None and previous.get("status") == "True":
                self.cond("SpecChangeIgnored", False, "SpecInSync", "the spec matches what every started stage uses")
            return
        pending = [x.value for x in self.spec.graph if x.value not in started]
        pending += [] if SERVING in started else [SERVING]
        parts = [f"{f} (started: {', '.join(st)})" for f, st in changes.items()]
        msg = ("changed after their stage started, kept at the started values: " + "; ".join(parts)
               + (f". Applied to stages not yet started: {', '.join(pending)}" if pending else ""))
        self.cond("SpecChangeIgnored", True, "StageAlreadyStarted", msg)

    @property
    def spec(self) -> Snapshot:
        assert self.snap is not None, "the spec did not validate"
        return self.snap

    def run(self, snap: Snapshot) -> Decision:
        self.snap = snap
        st = self.status
        st["observedGeneration"] = self.meta.generation
        if st.get("reason") == REASON_INVALID_SPEC:
            st.pop("refusedGeneration", None)
            st.update(phase="Pending", reason="SpecValid", message="the spec validates now")
            self.cond("Failed", False, "SpecValid", "the spec validates")
        st.setdefault("phase", "Pending")
        st.setdefault("stages", {})
        self.report_spec_changes()
        if st["phase"] == "Failed":
            return self.decision()  # terminal: attempts exhausted; delete and re-create the pipeline to rerun
        graph = snap.graph
        st["graph"] = graph_text(graph)
        for stage in graph:
            if (st["stages"].get(stage.value) or {}).get("phase") == "Succeeded":
                continue
            self.drive_stage(stage.value)
            return self.decision()
        self.drive_serving()
        return self.decision()

    def drive_stage(self, stage: str) -> None:
        st = self.status
        stages_st = st["stages"]
        s: dict[str, Any] = stages_st.setdefault(stage, {})
        suspended = self.spec.current.spec.suspend
        jobs = [j for j in self.observed.jobs.values() if j.stage == stage]
        attempt = max([int(s.get("attempts") or 0)] + [j.attempt for j in jobs])
        pipeline = self.spec.for_stage(stage)
        st["stage"] = stage
        if attempt == 0:
            if suspended:
                s.setdefault("phase", "Pending")
                self.set_suspended(stage, f"spec.suspend is true: stage {stage} does not start")
                return
            if st.get("phase") == "Suspended":
                self.resumed(stage)
            s.update(startTime=timestamp(self.now), **pin(self.spec.written, stage))
            self.start_attempt(stage, pipeline, 1, reason="StageStarted")
            return
        # Adopt what exists even if the status write of an earlier run was lost (restart mid-decision).
        if not s.get("specHash"):
            s.update(pin(self.spec.written, stage))
        if attempt > int(s.get("attempts") or 0) or not s.get("jobName"):
            s.update(attempts=attempt, jobName=job_name(self.meta.name, stage, attempt), phase="Running")
            s.setdefault("startTime", timestamp(self.now))
        st["attempts"] = attempt
        # Counted from the failed Jobs themselves (observe.classify_failure), so a lost status write loses nothing.
        disruptions = sum(1 for j in jobs
                          if j.attempt < attempt and self.observed.failure_kinds.get(j.name) == "disruption")
        if disruptions > int(s.get("disruptions") or 0):
            s["disruptions"] = disruptions
        job = self.observed.jobs.get(s["jobName"])
        if job is None or job.deleting:
            self.job_missing(stage, pipeline, attempt, job, suspended)
            return
        if job.phase == "Running" and pipeline.spec.network.policies:  # deleted by someone: isolate again
            self.create(build_stage_network_policy(pipeline, self.owner, stage, attempt))
        if job.phase == "Succeeded":
            self.job_succeeded(stage, job, pipeline)
        elif job.phase == "Failed":
            detail = self.observed.failure_details.get(job.name)
            msg = f"Job {job.name} failed ({job.failure or 'Failed'})" + (f": {detail}" if detail else "")
            kind = self.observed.failure_kinds.get(job.name, "failure")
            if kind == "user_error":
                self.config_error(stage, attempt, msg)
            else:
                self.attempt_failed(stage, pipeline, attempt, msg, disrupted=kind == "disruption")
        else:
            self.job_running(stage, job, suspended)

    def start_attempt(self, stage: str, pipeline: RLHFPipeline, attempt: int, reason: str) -> None:
        s = self.status["stages"][stage]
        name = job_name(self.meta.name, stage, attempt)
        # a disruption uses no attempt: the budget grows by each
        limit = pipeline.spec.stages.get(stage).backoff_limit + 1 + int(s.get("disruptions") or 0)
        # Pending (API conventions) until one of the Job's pods runs: job_running moves it on.
        s.update(phase="Pending", attempts=attempt, jobName=name)
        self.status.update(phase="Pending", stage=stage, attempts=attempt, reason=reason,
                           message=f"stage {stage}: attempt {attempt}/{limit}: created Job {name}, "
                                   "waiting for its pods to run")
        self.create_stage_children(stage, pipeline, attempt)
        self.cond("Ready", False, "Training", f"stage {stage} is running")

    def set_suspended(self, stage: str, message: str) -> None:
        self.status.update(phase="Suspended", reason="Suspended", message=message)
        self.cond("Suspended", True, "SpecSuspend", message)

    def job_missing(self, stage: str, pipeline: RLHFPipeline, attempt: int, job: JobState | None,
                    suspended: bool) -> None:
        s = self.status["stages"][stage]
        if suspended:
            s["phase"] = "Suspended"
            self.set_suspended(stage, f"stage {stage} attempt {attempt} is suspended (spec.suspend)")
            return
        if job is not None:  # the previous Job of this name is still being deleted: wait for it
            self.requeue = REQUEUE_SECONDS
            return
        if self.status.get("phase") == "Suspended":
            self.resumed(stage)
        # Created but not yet listed, deleted by someone, or deleted to suspend on an old server: (re)create.
        s["phase"] = "Pending"
        self.status.update(phase="Pending", stage=stage)
        self.create_stage_children(stage, pipeline, attempt)

    def create_stage_children(self, stage: str, pipeline: RLHFPipeline, attempt: int) -> None:
        if pipeline.spec.network.policies:  # first, so the pods start isolated
            self.create(build_stage_network_policy(pipeline, self.owner, stage, attempt))
        self.create(build_stage_service(self.owner, stage, attempt))
        self.create(build_stage_job(pipeline, self.owner, stage, attempt, default_image=self.config.default_image,
                                    suspend=bool(self.queue), job_suspend=self.config.job_suspend_supported,
                                    failure_policy=self.config.pod_failure_policy_supported,
                                    extra_labels=self.workload_labels, hardened=self.config.hardened_pods))

    def resumed(self, stage: str) -> None:
        msg = f"spec.suspend is false: stage {stage} resumes"
        self.status.update(phase="Pending", reason="Resumed", message=msg)  # Running once a pod runs again
        self.cond("Suspended", False, "Resumed", msg)

    def job_running(self, stage: str, job: JobState, suspended: bool) -> None:
        s = self.status["stages"][stage]
        if job.start_time and not s.get("startTime"):
            s["startTime"] = job.start_time
        # Only act on transitions of spec.suspend, so a queue (Kueue) that suspends/unsuspends the Job itself
        # is not overridden.
        if suspended:
            if self.status.get("phase") != "Suspended":
                # A queued Job's suspend belongs to the queue (it would admit it again): delete it instead, and the
                # resumed stage is a new Job the queue admits (it resumes from the newest checkpoint).
                if self.config.job_suspend_supported and not self.queue:
                    self.actions.append(Action("patch", "Job", job.name, {"spec": {"suspend": True}}))
                else:
                    self.actions.append(Action("delete", "Job", job.name))
                s["phase"] = "Suspended"
                self.set_suspended(stage, f"stage {stage}: Job {job.name} suspended (spec.suspend)")
            return
        queued = job.suspended
        if self.status.get("phase") == "Suspended":
            if job.suspended and not self.queue:  # never un-suspend what a queue holds
                self.actions.append(Action("patch", "Job", job.name, {"spec": {"suspend": False}}))
                queued = False  # this very decision unsuspends it
            self.resumed(stage)
        pods = self.observed.pods.get(job.name) or PodsState()
        if pods.running:
            self.pods_running(stage, job, pods)
        else:
            self.pods_pending(stage, job, pods, queued)

    def pods_running(self, stage: str, job: JobState, pods: PodsState) -> None:
        s = self.status["stages"][stage]
        msg = f"stage {stage}: attempt {job.attempt} running as Job {job.name} ({pods.running} pod(s) running)"
        if s.get("phase") != "Running" or self.status.get("phase") != "Running":
            self.status.update(reason="StageRunning", message=msg)
        s["phase"] = "Running"
        self.status.update(phase="Running", stage=stage)

    def pods_pending(self, stage: str, job: JobState, pods: PodsState, queued: bool) -> None:
        """The Job exists but none of its pods runs: Pending, with why (unschedulable, image pull, ...)."""
        s = self.status["stages"][stage]
        if queued:
            self.job_queued(stage, job)
            return
        refusal = self.observed.create_refusals.get(job.name) if pods.total == 0 else None
        if refusal:
            # The Job controller keeps trying (a quota may free up, a namespace label or ServiceAccount may be fixed);
            # the operator makes no new attempt, it says why nothing runs.
            reason = "FailedCreate"
            msg = f"stage {stage}: the Job controller cannot create the pods of Job {job.name}: {refusal}"
            self.cond("Ready", False, reason, msg)
            self.requeue = REQUEUE_SECONDS  # the Job object does not change: look again for the fix
        elif pods.total == 0:
            reason, msg = "PodsPending", f"stage {stage}: Job {job.name} is waiting for its pods to be created"
            self.requeue = REQUEUE_SECONDS  # a refusal shows only in the Job controller's Events
        else:
            # A kubelet flips between ErrImagePull and ImagePullBackOff: one reason, so one Event.
            reason = _SAME_WAITING.get(pods.reason or "", pods.reason or "PodsPending")
            msg = f"stage {stage}: Job {job.name} is waiting for its pods to run: {pods.message}"
        if pods.total or refusal or self.status.get("reason") not in ("StageStarted", "StageRetrying",
                                                                       "StageDisrupted", "Resumed"):
            # Until pods exist, keep the message of the transition that created the Job.
            self.status.update(reason=reason, message=msg)
        s["phase"] = "Pending"
        self.status.update(phase="Pending", stage=stage)

    def job_queued(self, stage: str, job: JobState) -> None:
        """A suspended Job the operator did not suspend: a queue (Kueue) holds it until its quota admits it."""
        s = self.status["stages"][stage]
        by = f"LocalQueue {self.queue!r}" if self.queue else "a queue (e.g. Kueue)"
        msg = f"stage {stage}: Job {job.name} is suspended, waiting for quota: {by} has not admitted it yet"
        if not self.config.job_suspend_supported:
            msg = (f"stage {stage}: Job {job.name} is held at parallelism 0, waiting for quota: {by} has not admitted "
                   "it yet (this server has no Job.spec.suspend, Kubernetes < 1.22, so Kueue cannot run here: "
                   "admit it by setting the Job's spec.parallelism to its completions, or remove the queue label)")
        s["phase"] = "Queued"
        self.status.update(phase="Queued", stage=stage, reason="WaitingForQuota", message=msg)

    def job_succeeded(self, stage: str, job: JobState, pipeline: RLHFPipeline) -> None:
        probe = self.probes.get(stage)
        uri = StageLayout.for_pipeline(pipeline, self.meta.namespace, self.meta.uid).stage_uri(stage)
        if probe is None or probe.error:
            why = probe.error if probe else "not checked yet"
            self.status["message"] = f"stage {stage}: Job {job.name} succeeded; checking {uri}/_COMPLETE ({why})"
            self.requeue = REQUEUE_SECONDS
            return
        if not probe.complete:
            msg = f"Job {job.name} succeeded but {uri}/_COMPLETE is missing, so the stage output does not exist"
            self.attempt_failed(stage, pipeline, job.attempt, msg)
            return
        s = self.status["stages"][stage]
        done_at = job.completion_time or timestamp(self.now)
        s.update(phase="Succeeded", completionTime=done_at, checkpoint=probe.checkpoint or uri,
                 manifestSha256=probe.manifest_sha256 or "")
        s.pop("message", None)
        started, finished = _parse_time(s.get("startTime")), _parse_time(done_at)
        if started and finished:
            self.durations[stage] = max(0.0, (finished - started).total_seconds())
        msg = f"stage {stage} succeeded: {s['checkpoint']} (manifest sha256 {s['manifestSha256'][:12]})"
        self.cond(CONDITION_OF_STAGE[stage], True, "CheckpointComplete", msg)
        # Go straight on to the next stage (or serving) in this same decision.
        graph = [x.value for x in self.spec.graph]
        nxt = graph[graph.index(stage) + 1:]
        if nxt:
            self.drive_stage(nxt[0])
        else:
            self.drive_serving()

    def attempt_failed(self, stage: str, pipeline: RLHFPipeline, attempt: int, msg: str,
                       disrupted: bool = False) -> None:
        """A failed attempt: retried while the failures (attempts less disruptions) stay within backoffLimit; a
        disruption (preemption, eviction, drain) is always retried and does not count."""
        s = self.status["stages"][stage]
        limit = pipeline.spec.stages.get(stage).backoff_limit
        s["message"] = msg
        if disrupted:
            s["disruptions"] = int(s.get("disruptions") or 0) + 1
            self.start_attempt(stage, pipeline, attempt + 1, reason="StageDisrupted")
            return
        disruptions = int(s.get("disruptions") or 0)
        if attempt - disruptions <= limit:
            self.start_attempt(stage, pipeline, attempt + 1, reason="StageRetrying")
            return
        text = (f"stage {stage} failed after {attempt} attempt(s) (backoffLimit {limit}"
                + (f"; {disruptions} disrupted attempt(s) not counted" if disruptions else "") + f"): {msg}")
        s["phase"] = "Failed"
        self.status.update(phase="Failed", stage=stage, reason="BackoffLimitExceeded", message=text)
        self.cond("Failed", True, "BackoffLimitExceeded", text)
        self.cond("Ready", False, "StageFailed", f"stage {stage} failed")

    def serving_protection(self, pipeline: RLHFPipeline, s: dict[str, Any]) -> None:
        """The chat's API key (the user's Secret, else a generated one; a Warning condition when auth is off), its
        NetworkPolicy and, with several replicas, a PodDisruptionBudget."""
        sv = pipeline.spec.serving
        secret = api_key_secret_name(pipeline, self.owner)
        if secret is None:
            self.status.pop("chatApiKeySecret", None)
            msg = "spec.serving.auth is false: the chat API and /metrics answer anyone who can reach the Service"
            self.cond("AuthDisabled", True, "ServingAuthOff", msg)
        else:
            self.status["chatApiKeySecret"] = secret  # the Secret's name (key API_KEY), never its value
            if get_condition(self.status, "AuthDisabled") is not None:
                self.cond("AuthDisabled", False, "APIKeyRequired", f"clients send the API key of Secret {secret}")
            if secret == generated_api_key_secret_name(self.meta.name) and sv.api_key_secret_ref is None:
                self.create_once(s, build_chat_api_key_secret(self.owner))
        if pipeline.spec.network.policies:
            self.create(build_chat_network_policy(pipeline, self.owner))
        if sv.replicas > 1:
            self.create_once(s, build_chat_disruption_budget(pipeline, self.owner,
                                                             api_version=self.config.pdb_api_version))

    def config_error(self, stage: str, attempt: int, msg: str) -> None:
        """The stage exited with the user-error code (EXIT_USER_ERROR): its configuration is wrong, so the pipeline
        fails at once with the stage's own message (it names the field); no attempt is retried."""
        s = self.status["stages"][stage]
        text = (f"stage {stage} attempt {attempt} stopped on a configuration error (exit code {EXIT_USER_ERROR}, not "
                f"retried; fix it and re-create the pipeline): {msg}")
        s.update(phase="Failed", message=msg)
        self.status.update(phase="Failed", stage=stage, reason=REASON_CONFIG_ERROR, message=text)
        self.cond("Failed", True, REASON_CONFIG_ERROR, text)
        self.cond("Ready", False, "StageFailed", f"stage {stage} failed")

    def drive_serving(self) -> None:
        st = self.status
        stages_st = st["stages"]
        pipeline = self.spec.for_serving()
        sv = pipeline.spec.serving
        if not sv.enabled:
            st.update(phase="Succeeded", stage=DONE, reason="Succeeded", message="all stages succeeded")
            self.cond("Ready", True, "Succeeded", "all stages succeeded; serving is disabled")
            return
        s: dict[str, Any] = stages_st.setdefault(SERVING, {})
        if not s.get("jobName"):
            s.update(startTime=timestamp(self.now), **pin(self.spec.written, SERVING),
                     phase="Running", attempts=1, jobName=chat_name(self.meta.name))
            st.update(phase="Running", stage=SERVING, attempts=1, reason="Serving",
                      message="creating the chat Deployment")
        endpoint = chat_endpoint(self.meta.name, self.meta.namespace, sv.port)
        st["chatEndpoint"] = endpoint
        self.serving_protection(pipeline, s)
        self.create(build_chat_service(pipeline, self.owner))
        self.create(build_chat_deployment(pipeline, self.owner, default_image=self.config.default_image,
                                          extra_labels=self.workload_labels, hardened=self.config.hardened_pods))
        dep = self.observed.deployments.get(chat_name(self.meta.name))
        if dep is not None and not dep.deleting and dep.available:
            if st.get("phase") != "Succeeded":
                s.update(phase="Succeeded", completionTime=timestamp(self.now))
            st.update(phase="Succeeded", stage=DONE, reason="Succeeded", message=f"chat at {endpoint}")
            self.cond("Serving", True, "DeploymentAvailable", f"{dep.ready_replicas} ready replica(s) at {endpoint}")
            self.cond("Ready", True, "Serving", f"chat at {endpoint}")
        else:
            self.cond("Serving", False, "DeploymentNotReady", "waiting for a ready chat replica")
            if st.get("phase") != "Succeeded":
                st.update(phase="Running", stage=SERVING)
                self.cond("Ready", False, "Starting", "waiting for a ready chat replica")
            self.requeue = REQUEUE_SECONDS


def reconcile(
    meta: PipelineMeta,
    spec: dict[str, Any],
    status: dict[str, Any] | None,
    observed: Observed,
    now: datetime,
    probes: dict[str, ProbeResult] | None = None,
    config: OperatorConfig | None = None,
) -> Decision:
    """Decide the children to create/patch/delete, the new status and the events. Pure and deterministic."""
    run = _Run(meta, status or {}, observed, now, probes or {}, config or OperatorConfig())
    try:
        resolved = _pipeline(meta, spec)
    except SpecError as e:
        return run.invalid(str(e))
    except ValidationError as e:  # metadata (e.g. a name too long for child names)
        return run.invalid(f"invalid RLHFPipeline metadata: {e.errors()[0]['msg']} (metadata.name)")
    # Everything checkable without a GPU fails here, before any child exists, and is never retried.
    problems = preflight(resolved.spec)
    if problems:
        return run.invalid(format_problems(problems))
    refused = pod_policy_problem(meta.namespace, resolved.spec, run.config)
    if refused:
        return run.invalid(refused)
    if run.status.get("reason") == REASON_INVALID_SPEC and run.status.get("refusedGeneration") == meta.generation:
        return run.invalid(run.status.get("message") or "")  # the API server refused this spec's children
    snap = Snapshot(meta, resolved, written_spec(spec), observed.jobs)
    moved = snap.storage_problem(status or {})
    if moved:  # what a current API server refuses on write (the CRD's transition rule), refused the same way
        return run.invalid(moved)
    return run.run(snap)


def refusal_is_config_error(code: int, message: str) -> bool:
    """Whether the API server's refusal of a child object is the spec's fault, so no retry can help: a 400 (the
    object does not decode, e.g. a bad quantity), a 422 (it does not validate) or an admission webhook's denial. A
    quota (403 'exceeded quota'), the operator's own RBAC (403) or a throttle (429) can change without a spec
    change."""
    return code in (400, 422) or (code == 403 and "denied the request" in message)


def child_refused(meta: PipelineMeta, status: dict[str, Any] | None, action: Action, code: int, message: str,
                  now: datetime) -> Decision:
    """The decision when the API server refused a child a decision created (``status`` is the status before that
    decision, so a stage whose Job was refused did not start). A spec error is ``InvalidSpec`` naming the object, the
    API server's field and the spec fields it was built from, and is not sent again until the spec changes; a
    refusal that can pass by itself keeps the phase, says why and looks again soon."""
    run = _Run(meta, status or {}, Observed(), now, {}, OperatorConfig())
    stage = ((action.body.get("metadata") or {}).get("labels") or {}).get(LABEL_STAGE)
    source = f"spec.stages.{stage}" if stage else "spec.serving"
    text = (f"the API server refused {action.kind} {action.name} (HTTP {code}): {message.strip()} -- it is built "
            f"from {source} (resources, env, podTemplate), spec.podTemplate and spec.shmSize")
    if refusal_is_config_error(code, message):
        decision = run.invalid(text)
        decision.status["refusedGeneration"] = meta.generation
        return decision
    run.status.update(reason=REASON_CREATE_REFUSED, message=text)  # its Event: transition_events
    run.status.setdefault("phase", "Pending")
    run.requeue = 30.0
    return run.decision()


def stages_to_probe(status: dict[str, Any] | None, observed: Observed) -> list[str]:
    """Stages whose current Job succeeded while the status does not yet record their checkpoint: the handler
    asks the object store about exactly these."""
    stages_st = (status or {}).get("stages") or {}
    out = []
    for stage in ALL_STAGES:
        s = stages_st.get(stage.value) or {}
        if s.get("phase") == "Succeeded":
            continue
        if any(j.stage == stage.value and j.phase == "Succeeded" for j in observed.jobs.values()):
            out.append(stage.value)
    return out


def storage_for_probe(spec: dict[str, Any], observed: Observed) -> dict[str, Any]:
    """The storage block the succeeded stages wrote to: their newest Job's (what it ran with), else the spec's."""
    for job in sorted(observed.jobs.values(), key=lambda j: (j.phase != "Succeeded", -j.attempt)):
        if job.pipeline:
            try:
                return parse_pipeline(job.pipeline).spec.storage.to_wire()
            except SpecError:
                continue
    return spec["storage"]
