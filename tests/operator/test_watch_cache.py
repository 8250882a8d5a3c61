"""The operator's child cache (kuberlhf_operator.watch_cache): reconcile reads children from kopf's indexes, built
here with kopf's own indexer classes (the e2e tier and the operator bench run them off real watch streams), and a
lagging cache never makes a second Job."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from kopf._core.engines.indexing import OperatorIndexer  # noqa: PLC2701 - the class kopf fills from a watch
from operator_sim import FakeKube, RecordingKube, pipeline

from kuberlhf.contract.stage import EXIT_USER_ERROR
from kuberlhf_operator.cluster import gather
from kuberlhf_operator.controller import Operator
from kuberlhf_operator.reconcile import OperatorConfig, PipelineMeta
from kuberlhf_operator.watch_cache import INDEX_OF_KIND, WatchCache, index_entry

META = PipelineMeta(name="tiny", namespace="team", uid="uid-1")
OWNER = [{"kind": "RLHFPipeline", "name": "tiny", "uid": "uid-1"}]


def child(kind: str, name: str, labels: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": f"u-{kind}-{name}",
            "ownerReferences": OWNER,
            "managedFields": [{"manager": "x"}],
            "labels": {"kuberlhf.io/pipeline": "tiny", **(labels or {})},
        },
        **extra,
    }


def job(name: str, attempt: int, status: dict[str, Any]) -> dict[str, Any]:
    return child(
        "Job",
        name,
        {"kuberlhf.io/stage": "sft", "kuberlhf.io/attempt": str(attempt)},
        spec={"completions": 1, "backoffLimit": 0},
        status=status,
    )


def pod(name: str, attempt: int, phase: str, **status: Any) -> dict[str, Any]:
    return child(
        "Pod",
        name,
        {"kuberlhf.io/component": "stage", "kuberlhf.io/stage": "sft", "kuberlhf.io/attempt": str(attempt)},
        status={"phase": phase, **status},
    )


def indexes(*objects: dict[str, Any]) -> dict[str, Any]:
    """kopf's indexes after these objects' watch events (kopf keys each object by namespace, name and uid)."""
    out = {index: OperatorIndexer() for index in INDEX_OF_KIND.values()}
    for obj in objects:
        m = obj["metadata"]
        out[INDEX_OF_KIND[obj["kind"]]].replace((m["namespace"], m["name"], m["uid"]), index_entry(obj))
    return {index: indexer.index for index, indexer in out.items()}


class ListCounting(FakeKube):
    def lists(self) -> list[str]:
        return [kind for verb, kind in self.calls if verb == "list"]


def test_an_index_keeps_the_object_by_pipeline_without_its_managed_fields() -> None:
    entry = index_entry(child("Service", "tiny-sft-1"))
    assert list(entry) == [("team", "tiny")]
    assert "managedFields" not in entry[("team", "tiny")]["metadata"]
    assert index_entry({"metadata": {"name": "x", "labels": {}}}) is None


def test_gather_from_the_cache_lists_nothing_and_sees_what_the_lists_see() -> None:
    objects = [
        job("tiny-sft-1", 1, {"active": 1}),
        child("Service", "tiny-sft-1"),
        child("NetworkPolicy", "tiny-sft-1"),
        pod("tiny-sft-1-0", 1, "Running"),
        child("Job", "other-sft-1", {"kuberlhf.io/pipeline": "other"}),  # another pipeline's
        {
            **child("Service", "stale"),
            "metadata": {**child("Service", "stale")["metadata"], "ownerReferences": [{"uid": "old-uid"}]},
        },
    ]  # a former uid's
    status = {"stages": {"sft": {"phase": "Pending", "attempts": 1}}}
    listed = gather(FakeKube(*copy.deepcopy(objects)), META, status)
    kube = ListCounting()
    cached = gather(kube, META, status, WatchCache(indexes(*objects)))
    assert kube.lists() == []  # no round trip at all
    assert cached == listed
    assert set(cached.jobs) == {"tiny-sft-1"} and cached.services == {"tiny-sft-1"}
    assert cached.pods["tiny-sft-1"].running == 1


def test_the_pods_of_a_current_attempt_that_failed_are_listed_fresh() -> None:
    """Pods and Jobs come on different watch streams: the cached pod may not yet say why it ended, and that decides
    between a retry, a disruption and a configuration error."""
    failed = job("tiny-sft-1", 1, {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})
    exited = pod(
        "tiny-sft-1-0",
        1,
        "Failed",
        containerStatuses=[
            {
                "name": "trainer",
                "state": {
                    "terminated": {"exitCode": EXIT_USER_ERROR, "message": "spec.stages.sft.learningRate: must be > 0"}
                },
            }
        ],
    )
    kube = ListCounting(copy.deepcopy(exited))
    observed = gather(
        kube,
        META,
        {"stages": {"sft": {"phase": "Running", "attempts": 1}}},
        WatchCache(indexes(failed, pod("tiny-sft-1-0", 1, "Running"))),
    )  # the cache lags
    assert kube.lists() == ["Pod"]
    assert observed.failure_kinds == {"tiny-sft-1": "user_error"}


def test_a_cache_that_never_saw_the_job_makes_no_second_job(spec: dict[str, Any]) -> None:
    """The reconcile right after a create may run before the watch shows the Job: it creates the same name again,
    which the API server answers 409, so one Job exists and the status tells one story."""
    kube = RecordingKube(pipeline(spec))
    events: list[str] = []
    op = Operator(kube, OperatorConfig(default_image="img:1"), emit=lambda body, ev: events.append(ev.reason))
    op.use_watch_cache(indexes())  # and it stays empty: the watch never delivers
    first = op.reconcile_pipeline("team", "tiny", "create")
    second = op.reconcile_pipeline("team", "tiny", "timer")
    assert first is not None and second is not None
    assert [w[2] for w in kube.writes if w[0] == "create" and w[1] == "Job"] == ["tiny-sft-1", "tiny-sft-1"]
    assert [name for kind, _, name in kube.objects if kind == "Job"] == ["tiny-sft-1"]
    assert second.status == first.status and events.count("StageStarted") == 1
    assert [kind for verb, kind in kube.calls if verb == "list"] == []


def test_the_cache_is_not_used_when_switched_off_or_without_kopfs_indexes(monkeypatch: Any) -> None:
    assert Operator(RecordingKube(), emit=lambda body, ev: None).cache is None
    op = Operator(RecordingKube(), emit=lambda body, ev: None)
    op.use_watch_cache({"kuberlhf_jobs": object()})  # a handler called by hand: not every index
    assert op.cache is None
    monkeypatch.setenv("KUBERLHF_WATCH_CACHE", "false")
    off = Operator(RecordingKube(), emit=lambda body, ev: None)
    off.use_watch_cache(indexes())
    assert off.cache is None


def test_a_decisions_creates_go_out_together_after_its_network_policy() -> None:
    """writes.apply_actions with a pool: the NetworkPolicy (and a Secret) first, the Service and the Job at once;
    the first failure in the decision's order is the one raised."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from kubernetes.client.exceptions import ApiException

    from kuberlhf_operator.reconcile import Action, Decision
    from kuberlhf_operator.writes import ActionFailed, apply_actions

    class Barrier(RecordingKube):
        """Creates of a Service and a Job each wait until both are in flight (a deadlock if sent one by one)."""

        def __init__(self, refuse: set[str]) -> None:
            super().__init__()
            self.refuse, self.both = refuse, threading.Barrier(2, timeout=10)

        def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
            if kind in ("Service", "Job"):
                assert ("create", "NetworkPolicy") in [(w[0], w[1]) for w in self.writes]
                self.both.wait()
            if kind in self.refuse:
                raise ApiException(status=403, reason=f"{kind} refused")
            return super().create(kind, namespace, body)

    actions = [
        Action("create", kind, "tiny-sft-1", {"metadata": {"name": "tiny-sft-1"}})
        for kind in ("NetworkPolicy", "Service", "Job")
    ]
    with ThreadPoolExecutor(4) as pool:
        kube = Barrier(refuse=set())
        apply_actions(kube, "team", Decision({}, actions), pool)
        assert {kind for kind, _, _ in kube.objects} == {"NetworkPolicy", "Service", "Job"}
        with pytest.raises(ActionFailed) as refused:
            apply_actions(Barrier(refuse={"Service", "Job"}), "team", Decision({}, actions), pool)
        assert refused.value.action.kind == "Service"
