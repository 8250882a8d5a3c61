"""The operator object: one reconcile of one pipeline, end to end, and the state that lives between reconciles.

:meth:`Operator.reconcile_pipeline` reads the pipeline fresh, gathers what it owns (``cluster``), probes the object
store (``storage_probe``), calls the pure :func:`~kuberlhf_operator.reconcile.reconcile`, then applies the
decision, writes the status and emits the events (``writes``). It serves every cause (create, resume after an
operator restart, spec update, the safety loop, and Job/Pod/Deployment events that wake the owner promptly); a
per-pipeline lock keeps them from interleaving.

All mutable state is here, on one object the kopf handlers get through kopf's ``memo``: the locks, the wake-up
schedule and change filters (``wakeups``), the object-store client cache and the operator's configuration. A
pipeline's lock and schedule entry are pruned when the pipeline goes away.

The route of one field, ``spec.stages.ppo.actorZeroStage``, from the CR to DeepSpeed:

1. the API server checks it against the CRD schema (generated from the spec models: integer, 0-3);
2. ``reconcile`` validates the object's ``spec`` once with the pydantic models (``parse_spec``: the range, the
   presets fill it when unset, the preflight checks its combinations) into a ``PipelineSpec``, the decision's
   ``Snapshot``; status is never read as configuration;
3. the Job builder serialises that spec once into the pod's ``KUBERLHF_PIPELINE`` env: the pod boundary, the one
   round trip;
4. in the pod, ``StageContext.from_env`` validates it with the same models, and the DeepSpeed config builder
   (``kuberlhf.training.ds_config``) copies ``actor_zero_stage`` into ``zero_optimization.stage``
   (``settings_problems`` still range-checks it there, for ``TrainSettings`` a Python API user builds by hand).

A retry of a started stage resumes its run, so it is built from the spec the stage's newest Job carries (step 3's
output, read back from the immutable Job and validated again), not from an edited spec (``reconcile.Snapshot``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ConflictError

from kuberlhf.contract.spec import API_GROUP
from kuberlhf_operator import metrics, wakeups
from kuberlhf_operator.cluster import gather
from kuberlhf_operator.kube import Kube
from kuberlhf_operator.reconcile import (
    REASON_INVALID_SPEC,
    Decision,
    OperatorConfig,
    PipelineMeta,
    child_refused,
    reconcile,
)
from kuberlhf_operator.storage_probe import probe
from kuberlhf_operator.watch_cache import WatchCache
from kuberlhf_operator.writes import (
    ActionFailed,
    EmitEvent,
    apply_actions,
    emit_events,
    kopf_event,
    write_status,
)

ERROR_RETRY_SECONDS = 10.0
STATUS_CONFLICT_RETRIES = 4
JOB_SUSPEND_SINCE = (1, 22)
POD_FAILURE_POLICY_SINCE = (1, 26)  # beta, on by default (alpha and off in 1.25)
PDB_V1_SINCE = (1, 21)
Key = tuple[str, str]


# A create the API server answers with one of these is about the object: bad request (it does not decode, e.g. a
# bad quantity), forbidden (admission, quota, RBAC), invalid, too many requests (reconcile.child_refused sorts them).
REFUSED_CODES = (400, 403, 422, 429)


def workers() -> int:
    """Concurrent reconciles (kopf's handler threads), and threads for their concurrent creates."""
    return int(os.environ.get("KUBERLHF_OPERATOR_WORKERS", "8"))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _error_message(e: ApiException) -> str:
    """The API server's Status message (it names the field), else the raw body."""
    body = e.body if isinstance(e.body, str) else (e.body or b"").decode("utf-8", "replace")
    try:
        return str(json.loads(body).get("message") or body)
    except (ValueError, AttributeError):
        return body or str(e.reason)


def terminal(status: dict[str, Any]) -> bool:
    """Failed for good (attempts exhausted, a user error): only a spec change, which kopf's update handler sees,
    can move it. InvalidSpec is not terminal here: the safety net re-checks it."""
    return status.get("phase") == "Failed" and status.get("reason") != REASON_INVALID_SPEC


class Operator:
    def __init__(self, kube: Kube | None = None, config: OperatorConfig | None = None, *, namespaced: bool = False,
                 safety_interval: float = 60.0, emit: EmitEvent = kopf_event, apply_workers: int = 0) -> None:
        self.kube = kube or Kube()
        self.config = config or OperatorConfig()
        self.namespaced = namespaced  # namespaced operators skip kopf's namespace scanning
        self.safety_interval = safety_interval
        self.emit = emit
        self.stores = wakeups.StoreCache()
        self.schedule = wakeups.Schedule()
        self.jobs_seen = wakeups.ChangeFilter()
        self.pods_seen = wakeups.ChangeFilter()
        self.deployments_seen = wakeups.ChangeFilter()
        self._locks: dict[Key, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._handler_context: contextvars.Context | None = None  # see remember_handler_context
        self._stop = threading.Event()
        # Threads for a decision's concurrent creates (writes.apply_actions); 0: every action in order.
        self._apply_pool = ThreadPoolExecutor(apply_workers, thread_name_prefix="kuberlhf-apply") if apply_workers \
            else None
        # The children as kopf's watch streams show them (watch_cache), once a handler has handed over the kopf
        # indexes; None until then, and always None when KUBERLHF_WATCH_CACHE=false: gather lists each kind.
        self.cache: WatchCache | None = None
        self.watch_cache_enabled = os.environ.get("KUBERLHF_WATCH_CACHE", "true").lower() != "false"

    # --- state between reconciles ------------------------------------------------------------------------------
    def lock(self, key: Key) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def use_watch_cache(self, indices: Mapping[str, Any]) -> None:
        """Read children from kopf's indexes (a resource handler's kwargs) from now on, unless switched off (or
        called without them: a handler invoked by hand)."""
        if self.cache is None and self.watch_cache_enabled and WatchCache.holds_all(indices):
            self.cache = WatchCache(indices)

    def forget(self, key: Key) -> None:
        """The pipeline is gone: drop everything kept for it."""
        with self._locks_guard:
            self._locks.pop(key, None)
        self.schedule.drop(key)
        metrics.set_phase(key[0], key[1], None)

    def tracked(self) -> int:
        with self._locks_guard:
            return len(self._locks)

    # --- startup -------------------------------------------------------------------------------------------------
    def configure_kopf(self, settings: kopf.OperatorSettings, logger: logging.Logger | logging.LoggerAdapter) -> None:
        # Progress and the last-handled spec live in annotations: status belongs to reconcile alone, and no
        # finalizers are needed (children are owned and garbage-collected with the pipeline).
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=API_GROUP)
        settings.persistence.finalizer = f"{API_GROUP}/kopf-finalizer"
        settings.peering.standalone = True
        if self.namespaced:
            # The watched namespaces are listed explicitly: scanning would list/watch Namespace objects, which a
            # namespaced install's RBAC does not grant (kopf then retries for about a minute before handling).
            settings.scanning.disabled = True
        settings.posting.level = logging.WARNING
        settings.posting.reporting_component = "kuberlhf-operator"
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.execution.max_workers = workers()
        supported = self._server_has("KUBERLHF_JOB_SUSPEND", JOB_SUSPEND_SINCE, logger)
        failure_policy = self._server_has("KUBERLHF_POD_FAILURE_POLICY", POD_FAILURE_POLICY_SINCE, logger)
        try:
            pdb = "policy/v1" if self.kube.server_version() >= PDB_V1_SINCE else "policy/v1beta1"
        except Exception:  # noqa: BLE001 - as in _server_has
            pdb = "policy/v1"
        self.config = dataclasses.replace(self.config, job_suspend_supported=supported, pdb_api_version=pdb,
                                          pod_failure_policy_supported=failure_policy)
        logger.info("kuberlhf operator: default image %s, Job suspend %s, Job podFailurePolicy %s, strict field "
                    "validation %s", self.config.default_image,
                    "native" if supported else "by deleting the Job, queued Jobs held at parallelism 0 (server < 1.22)",
                    "on" if failure_policy else "off (server < 1.26: the operator classifies failed pods itself)",
                    "on" if self._strict() else "off (server < 1.25)")

    def _server_has(self, env: str, since: tuple[int, int], logger: logging.Logger | logging.LoggerAdapter) -> bool:
        """Whether the server's version has a Job feature: ``env`` (true/false) overrides, ``auto`` asks."""
        override = os.environ.get(env, "auto").lower()
        if override in ("true", "false"):
            return override == "true"
        try:
            return self.kube.server_version() >= since
        except Exception as e:  # noqa: BLE001
            logger.warning("cannot read the server version (%s); assuming it is >= %s.%s (%s)", e, *since, env)
            return True

    def _strict(self) -> bool:
        try:
            return self.kube.strict_writes()
        except Exception:  # noqa: BLE001 - asked again on the first write
            return False

    # --- one reconcile ---------------------------------------------------------------------------------------------
    def reconcile_pipeline(self, namespace: str, name: str, trigger: str = "manual",
                           now: datetime | None = None) -> Decision | None:
        """Read the pipeline fresh, decide, apply children, write status (optimistically), emit events."""
        key = (namespace, name)
        metrics.RECONCILES.labels(trigger=trigger).inc()
        lock, t_wait = self.lock(key), time.perf_counter()
        with lock:
            metrics.RECONCILE_PHASE_SECONDS.labels(phase="lock").observe(time.perf_counter() - t_wait)
            # A decision whose status write loses a conflict emits nothing: the redo starts from the same stored
            # status and adopts the children it made, so it derives the same transitions' events
            # (reconcile.transition_events compares the stored status with the new one).
            for _ in range(STATUS_CONFLICT_RETRIES):
                with metrics.phase("read"):
                    body = self.kube.get("RLHFPipeline", namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    self.forget(key)
                    return None
                m = body["metadata"]
                meta = PipelineMeta(name=m["name"], namespace=m["namespace"], uid=m["uid"],
                                    generation=int(m.get("generation") or 1), labels=dict(m.get("labels") or {}))
                spec, status = body.get("spec") or {}, body.get("status") or {}
                with metrics.phase("gather"):
                    observed = gather(self.kube, meta, status, self.cache)
                with metrics.phase("probe"):
                    probes = probe(self.kube, self.stores, meta, spec, status, observed)
                with metrics.phase("decide"):
                    decision = reconcile(meta, spec, status, observed, now or _now(), probes, self.config)
                try:
                    with metrics.phase("apply"):
                        apply_actions(self.kube, namespace, decision, self._apply_pool)
                except ActionFailed as failed:
                    if failed.action.verb != "create" or failed.error.status not in REFUSED_CODES:
                        raise failed.error from None  # not about the object: retried (guarded)
                    decision = child_refused(meta, status, failed.action, failed.error.status,
                                             _error_message(failed.error), now or _now())
                if decision.status != status:
                    try:
                        with metrics.phase("status"):
                            write_status(self.kube, body, decision.status)
                    except ConflictError:  # someone (kopf's annotations) wrote in between: decide again
                        continue
                with metrics.phase("events"):
                    emit_events(body, decision, self.emit)
                for stage, seconds in decision.stage_durations.items():
                    metrics.STAGE_SECONDS.labels(stage=stage).observe(seconds)
                metrics.set_phase(namespace, name, decision.status.get("phase"))
                if terminal(decision.status):
                    self.schedule.drop(key)  # nothing changes without a spec change, which the update handler sees
                else:
                    delay = decision.requeue_after or wakeups.safety_interval(len(self.schedule), self.safety_interval)
                    self.schedule.set(key, time.monotonic() + delay)
                return decision
            raise kopf.TemporaryError(f"status of {namespace}/{name} kept changing; retrying", delay=2)

    def guarded(self, namespace: str, name: str, trigger: str, logger: logging.Logger | logging.LoggerAdapter) -> None:
        """:meth:`reconcile_pipeline` with every failure turned into a kopf retry (and counted)."""
        # Until this run succeeds, the safety loop retries it soon (a failed run leaves no fresh schedule).
        self.schedule.set((namespace, name), time.monotonic() + ERROR_RETRY_SECONDS)
        try:
            self.reconcile_pipeline(namespace, name, trigger)
        except kopf.TemporaryError:
            metrics.RECONCILE_ERRORS.labels(kind="conflict").inc()
            raise
        except ApiException as e:
            metrics.RECONCILE_ERRORS.labels(kind="api").inc()
            body = e.body if isinstance(e.body, str) else (e.body or b"").decode("utf-8", "replace")
            raise kopf.TemporaryError(f"API error {e.status} {e.reason}: {body[:300]}", delay=5) from e
        except Exception as e:
            metrics.RECONCILE_ERRORS.labels(kind=type(e).__name__).inc()
            logger.exception("reconcile of %s/%s failed", namespace, name)
            raise kopf.TemporaryError(f"{type(e).__name__}: {e}", delay=10) from e

    # --- the safety net -------------------------------------------------------------------------------------------
    # Not a kopf timer: kopf puts a finalizer on every object a timer or daemon serves, so deleting a pipeline (or
    # its namespace) would hang while the operator is down or uninstalled. A plain thread needs no finalizer;
    # children go with the pipeline through their ownerReferences (the garbage collector).
    def remember_handler_context(self) -> None:
        """Keep the context of a kopf handler call: kopf.event finds kopf's event queue through context variables
        that kopf sets only for its handlers, so the safety thread runs its reconciles in a copy of it."""
        if self._handler_context is None:
            self._handler_context = contextvars.copy_context()

    def run_due(self, now: float, logger: logging.Logger | logging.LoggerAdapter) -> list[Key]:
        """Reconcile every pipeline whose time has come (a requeue its decision asked for, the safety interval,
        the retry after a failed run). Returns the pipelines it ran."""
        due = self.schedule.due_keys(now)
        context = self._handler_context
        for namespace, name in due:
            with contextlib.suppress(kopf.TemporaryError):  # guarded counted it and scheduled the retry
                if context is None:
                    self.guarded(namespace, name, "timer", logger)
                else:
                    context.copy().run(self.guarded, namespace, name, "timer", logger)
        return due

    def start_safety_loop(self, tick: float, logger: logging.Logger | logging.LoggerAdapter) -> threading.Thread:
        self._stop.clear()

        def loop() -> None:
            while not self._stop.wait(tick):
                try:
                    self.run_due(time.monotonic(), logger)
                except Exception:  # noqa: BLE001 - the loop must outlive any one pipeline's trouble
                    logger.exception("safety reconcile loop")

        thread = threading.Thread(target=loop, name="kuberlhf-safety", daemon=True)
        thread.start()
        return thread

    def stop_safety_loop(self) -> None:
        self._stop.set()

    def child_changed(self, seen: wakeups.ChangeFilter, type_: str | None, uid: str, key: Any,
                      first_matters: bool) -> bool:
        if type_ == "DELETED":
            seen.forget(uid)
            return True
        return seen.changed(uid, key, first_matters=first_matters)
