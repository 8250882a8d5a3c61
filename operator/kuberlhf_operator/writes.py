"""Writing to the cluster: a decision's child actions (idempotent: deterministic names, a repeated create is a
409 and harmless), the status as one optimistic merge patch, and events through kopf's event API (queued and
posted by kopf, best effort: the status carries the same facts)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from kuberlhf_operator.kube import Kube
from kuberlhf_operator.manifests import GENERATED_KEYS_ANNOTATION
from kuberlhf_operator.reconcile import Action, Decision, Event

log = logging.getLogger("kuberlhf.operator")
EmitEvent = Callable[[dict[str, Any], Event], None]


def with_generated_values(body: dict[str, Any]) -> dict[str, Any]:
    """A Secret to create with fresh random values in the keys its GENERATED_KEYS_ANNOTATION names (the chat's API
    key); any other object as it is. 32 random bytes, URL-safe (secrets.token_urlsafe)."""
    keys = ((body.get("metadata") or {}).get("annotations") or {}).get(GENERATED_KEYS_ANNOTATION)
    if body.get("kind") != "Secret" or not keys:
        return body
    return {**body, "stringData": {k.strip(): secrets.token_urlsafe(32) for k in keys.split(",") if k.strip()}}


class ActionFailed(Exception):
    """The API server answered one of a decision's actions with an error (``error``)."""

    def __init__(self, action: Action, error: ApiException) -> None:
        super().__init__(f"{action.verb} {action.kind} {action.name}: {error.status} {error.reason}")
        self.action, self.error = action, error


# Children others rely on as they start: the chat's API-key Secret (its pods read it) and the NetworkPolicies (a
# stage's pods start isolated). They are created first; the rest of a decision's creates go out together.
CREATE_FIRST = ("Secret", "NetworkPolicy")


def apply_actions(kube: Kube, namespace: str, decision: Decision, pool: Executor | None = None) -> None:
    """Apply a decision's actions. With ``pool``, the creates after ``CREATE_FIRST``'s run concurrently (the
    Service and the Job of a stage attempt: one round trip of latency instead of two); a decision with a patch or
    a delete runs in order, as does everything without a pool. The first failure in the decision's order wins."""
    first = [a for a in decision.actions if a.verb == "create" and a.kind in CREATE_FIRST]
    rest = [a for a in decision.actions if not (a.verb == "create" and a.kind in CREATE_FIRST)]
    if pool is None or len(rest) < 2 or any(a.verb != "create" for a in rest):
        first, rest = list(decision.actions), []
    for action in first:
        _apply_one(kube, namespace, action)
    failures = [f.exception() for f in [pool.submit(_apply_one, kube, namespace, a) for a in rest]] if rest else []
    for failure in failures:
        if failure is not None:
            raise failure


def _apply_one(kube: Kube, namespace: str, action: Action) -> None:
    try:
        _apply(kube, namespace, action)
    except ApiException as e:
        raise ActionFailed(action, e) from e


def _apply(kube: Kube, namespace: str, action: Action) -> None:
    if action.verb == "create":
        if kube.create(action.kind, namespace, with_generated_values(action.body)):
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


def write_status(kube: Kube, body: dict[str, Any], new: dict[str, Any]) -> None:
    """Patch the status from what ``body`` held to ``new``, conditional on ``body``'s resourceVersion (a 409
    ConflictError tells the caller someone wrote in between)."""
    meta = body["metadata"]
    kube.patch("RLHFPipeline", meta["namespace"], meta["name"], sub="status", body={
        "metadata": {"resourceVersion": meta["resourceVersion"]},
        "status": status_patch(body.get("status") or {}, new)})


def kopf_event(body: dict[str, Any], event: Event) -> None:
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def emit_events(body: dict[str, Any], decision: Decision, emit: EmitEvent = kopf_event) -> None:
    meta = body.get("metadata") or {}
    for event in decision.events:
        # kopf posts Events later and best effort: the log keeps a line for each one handed over
        log.info("event %s/%s %s %s: %s", meta.get("namespace"), meta.get("name"), event.type, event.reason,
                 event.message[:200].replace("\n", " "))
        emit(body, event)
