"""The kopf registrations, and nothing else: each handler finds the :class:`~kuberlhf_operator.controller.Operator`
in kopf's ``memo`` (``main`` passes it to ``kopf.run``) and asks it to reconcile the pipeline concerned.

Cost at scale (wakeups.py): child events reconcile only when what reconcile reads of the child changed, the safety
loop reconciles a pipeline only when it is due (a requeue the decision asked for, else a safety interval that grows
with the number of pipelines).

No handler here makes kopf put a finalizer on pipelines (no timer, daemon or deletion handler): the safety net is
the operator's own thread (``Operator.start_safety_loop``), so deleting a pipeline or its namespace completes while
the operator is down or uninstalled."""

from __future__ import annotations

import logging
import os
from typing import Any

import kopf

from kuberlhf.contract.spec import API_GROUP, API_VERSION, PLURAL
from kuberlhf_operator import LABEL_COMPONENT, LABEL_PIPELINE, wakeups
from kuberlhf_operator.controller import Operator
from kuberlhf_operator.watch_cache import INDEX_OF_KIND, index_entry

# The safety loop looks every TIMER_TICK seconds for pipelines that are due.
TIMER_TICK = min(float(os.environ.get("KUBERLHF_RECONCILE_INTERVAL", "60")),
                 float(os.environ.get("KUBERLHF_TIMER_TICK", "5")))


def _op(memo: kopf.Memo, kwargs: dict[str, Any]) -> Operator:
    op: Operator = memo["operator"]
    op.remember_handler_context()
    # kopf calls a resource handler only once every index is filled from its initial list, and every handler's
    # kwargs hold the (live) indexes: from now on reconciles read children from them.
    op.use_watch_cache(kwargs)
    return op


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    op: Operator = memo["operator"]  # not _op: a startup handler's context has no event queue yet
    op.configure_kopf(settings, logger)
    op.start_safety_loop(TIMER_TICK, logger)


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo["operator"].stop_safety_loop()


# --- the watch-stream caches of the children (watch_cache): kopf indexes, read by every reconcile ---------------


@kopf.index("batch", "v1", "jobs", id=INDEX_OF_KIND["Job"], labels={LABEL_PIPELINE: kopf.PRESENT})
async def index_jobs(body: kopf.Body, **_: Any) -> Any:  # async: kopf runs it on its loop, no thread hop
    return index_entry(body)


@kopf.index("", "v1", "services", id=INDEX_OF_KIND["Service"], labels={LABEL_PIPELINE: kopf.PRESENT})
async def index_services(body: kopf.Body, **_: Any) -> Any:
    return index_entry(body)


@kopf.index("apps", "v1", "deployments", id=INDEX_OF_KIND["Deployment"], labels={LABEL_PIPELINE: kopf.PRESENT})
async def index_deployments(body: kopf.Body, **_: Any) -> Any:
    return index_entry(body)


@kopf.index("networking.k8s.io", "v1", "networkpolicies", id=INDEX_OF_KIND["NetworkPolicy"],
            labels={LABEL_PIPELINE: kopf.PRESENT})
async def index_network_policies(body: kopf.Body, **_: Any) -> Any:
    return index_entry(body)


@kopf.index("", "v1", "pods", id=INDEX_OF_KIND["Pod"], labels={LABEL_PIPELINE: kopf.PRESENT, LABEL_COMPONENT: "stage"})
async def index_stage_pods(body: kopf.Body, **_: Any) -> Any:
    return index_entry(body)


@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
def on_create(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    _op(memo, _).guarded(namespace, name, "create", logger)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
def on_resume(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    _op(memo, _).guarded(namespace, name, "resume", logger)


@kopf.on.update(API_GROUP, API_VERSION, PLURAL, field="spec")
def on_update(namespace: str, name: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    _op(memo, _).guarded(namespace, name, "update", logger)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def on_pipeline_event(type: str, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    if type == "DELETED":
        _op(memo, _).forget((namespace, name))


def _wake_owner(op: Operator, namespace: str, labels: dict[str, str], trigger: str, logger: logging.Logger) -> None:
    owner = labels.get(LABEL_PIPELINE)
    if owner:
        op.guarded(namespace, owner, trigger, logger)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL_PIPELINE: kopf.PRESENT})
def on_job_event(type: str, namespace: str, body: kopf.Body, labels: dict[str, str],  # noqa: A002
                 memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    op = _op(memo, _)
    key = wakeups.job_key(dict(body))
    if op.child_changed(op.jobs_seen, type, body.metadata.uid, key, wakeups.job_first_sight_matters(key)):
        _wake_owner(op, namespace, labels, "job", logger)


@kopf.on.event("", "v1", "pods", labels={LABEL_PIPELINE: kopf.PRESENT, LABEL_COMPONENT: "stage"})
def on_pod_event(type: str, namespace: str, body: kopf.Body, labels: dict[str, str],  # noqa: A002
                 memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    op = _op(memo, _)
    if type == "DELETED":
        # A running pod gone (evicted, preempted) may leave its Job waiting for a replacement: look again. Other
        # deletions (finished pods, the pipeline's garbage collection) are told by the Job's own events.
        last = op.pods_seen.forget(body.metadata.uid)
        if last is not None and last[0] == "Running":  # type: ignore[index]
            _wake_owner(op, namespace, labels, "pod", logger)
        return
    key = wakeups.pod_key(dict(body))
    if op.pods_seen.changed(body.metadata.uid, key, first_matters=wakeups.pod_first_sight_matters(key)):
        _wake_owner(op, namespace, labels, "pod", logger)


@kopf.on.event("apps", "v1", "deployments", labels={LABEL_PIPELINE: kopf.PRESENT})
def on_deployment_event(type: str, namespace: str, body: kopf.Body, labels: dict[str, str],  # noqa: A002
                        memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    op = _op(memo, _)
    key = wakeups.deployment_key(dict(body))
    if op.child_changed(op.deployments_seen, type, body.metadata.uid, key,
                        wakeups.deployment_first_sight_matters(key)):
        _wake_owner(op, namespace, labels, "deployment", logger)
