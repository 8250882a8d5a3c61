"""The operator object: one reconcile end to end against an in-memory API (a recording stand-in for the API
server; the e2e tier runs the same object against the real kube-apiserver), events through the injected emitter,
and per-pipeline state pruned when the pipeline goes away."""

from __future__ import annotations

import logging

from operator_sim import RecordingKube, pipeline

from kuberlhf_operator.controller import Operator
from kuberlhf_operator.reconcile import OperatorConfig


def phase_count(phase: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("kuberlhf_reconcile_phase_seconds_count", {"phase": phase}) or 0.0


def test_one_reconcile_creates_the_first_stage_writes_status_once_and_emits_its_events(spec) -> None:
    kube = RecordingKube(pipeline(spec))
    events: list[tuple[str, str]] = []
    op = Operator(kube, OperatorConfig(default_image="img:1"), emit=lambda body, ev: events.append(
        (body["metadata"]["uid"], ev.reason)))
    phases = ("lock", "read", "gather", "probe", "decide", "apply", "status", "events")
    before = {p: phase_count(p) for p in phases}
    decision = op.reconcile_pipeline("team", "tiny", "create")
    # each phase of the reconcile timed once (kuberlhf_reconcile_phase_seconds: the operator bench's profile)
    assert {p: phase_count(p) - before[p] for p in phases} == dict.fromkeys(phases, 1)
    created = [(w[1], w[2]) for w in kube.writes if w[0] == "create"]
    assert created == [("NetworkPolicy", "tiny-sft-1"), ("Service", "tiny-sft-1"), ("Job", "tiny-sft-1")]
    status_writes = [w for w in kube.writes if w[1] == "RLHFPipeline/status"]
    assert len(status_writes) == 1 and status_writes[0][3]["metadata"] == {"resourceVersion": "7"}
    assert status_writes[0][3]["status"]["stage"] == "sft"
    assert events == [("uid-1", ev.reason) for ev in decision.events] and events
    assert op.tracked() == 1 and op.schedule.due(("team", "tiny"), float("inf"))


def test_a_deleted_pipeline_is_forgotten(spec) -> None:
    kube = RecordingKube(pipeline(spec))
    op = Operator(kube, emit=lambda body, ev: None)
    op.reconcile_pipeline("team", "tiny")
    del kube.objects[("RLHFPipeline", "team", "tiny")]
    assert op.reconcile_pipeline("team", "tiny") is None
    assert op.tracked() == 0 and len(op.schedule) == 0


def test_events_survive_a_status_conflict_after_the_children_were_created(spec) -> None:
    """kopf writes its annotations on the pipeline concurrently: when the status write of a decision that created
    a Job loses that race, the redo only adopts the Job, yet the transition's events must still be emitted (once:
    the redo derives them from the stored status, which the lost write did not change)."""
    kube = RecordingKube(pipeline(spec), status_conflicts=1)
    events: list[str] = []
    op = Operator(kube, OperatorConfig(default_image="img:1"), emit=lambda body, ev: events.append(ev.reason))
    op.reconcile_pipeline("team", "tiny", "create")
    assert [w[2] for w in kube.writes if w[0] == "create" and w[1] == "Job"] == ["tiny-sft-1"]  # the redo adopts it
    assert "StageStarted" in events and len(events) == len(set(events)), events
    assert kube.objects[("RLHFPipeline", "team", "tiny")]["status"]["stage"] == "sft"


def test_no_kopf_handler_makes_kopf_put_a_finalizer_on_pipelines() -> None:
    """kopf adds its finalizer for timers, daemons and non-optional deletion handlers; with one, deleting a pipeline
    (or its namespace) hangs while the operator is down or uninstalled."""
    import kopf

    from kuberlhf_operator import handlers  # noqa: F401 - registers the handlers

    registry = kopf.get_default_registry()
    for sub in (registry._spawning, registry._changing, registry._watching):  # noqa: SLF001 - no public listing
        needing = [h.id for h in sub.get_all_handlers() if getattr(h, "requires_finalizer", None)]
        assert not needing, needing


def test_the_safety_thread_reconciles_due_pipelines_and_emits_through_kopfs_queue(spec) -> None:
    """The safety net is a plain thread: it runs only the pipelines that are due, and its events reach kopf's event
    queue through the context kept from a kopf handler call (kopf.event reads context variables kopf sets only for
    its handlers; here they are set by hand as kopf's per-object processing sets them)."""
    import asyncio
    import contextvars
    import threading
    import time

    import kopf
    from kopf._core.engines import posting  # noqa: PLC2701 - the variables kopf.event reads

    from kuberlhf_operator.writes import kopf_event

    kube = RecordingKube(pipeline(spec), {**pipeline(spec), "metadata": {**pipeline(spec)["metadata"],
                                                                          "name": "later", "uid": "uid-2"}})
    op = Operator(kube, OperatorConfig(default_image="img:1"), emit=kopf_event)
    loop = asyncio.new_event_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def as_kopf_handler() -> None:
        posting.settings_var.set(kopf.OperatorSettings())
        posting.event_queue_loop_var.set(loop)
        posting.event_queue_var.set(queue)
        op.remember_handler_context()

    contextvars.copy_context().run(as_kopf_handler)
    now = time.monotonic()
    op.schedule.set(("team", "tiny"), now - 1)
    op.schedule.set(("team", "later"), now + 3600)
    ran: list = []
    thread = threading.Thread(target=lambda: ran.extend(op.run_due(time.monotonic(), logging.getLogger("t"))))
    thread.start()
    thread.join(30)
    loop.run_until_complete(asyncio.sleep(0))  # the thread posted with call_soon_threadsafe
    posted = []
    while not queue.empty():
        posted.append(queue.get_nowait())
    loop.close()
    assert ran == [("team", "tiny")]
    assert [w[2] for w in kube.writes if w[0] == "create"] == ["tiny-sft-1"] * 3  # NetworkPolicy, Service, Job
    assert [e.reason for e in posted] == ["StageStarted"] and posted[0].ref["name"] == "tiny"
    assert not op.schedule.due(("team", "tiny"), time.monotonic())  # rescheduled by its own decision
