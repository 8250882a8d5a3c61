"""What wakes a reconcile (child events only on relevant change, the adaptive safety timer) and the cached
object-store clients (real SeaweedFS for the probe)."""

from __future__ import annotations

from pathlib import Path

from operator_sim import FakeKube, secret

from kuberlhf.contract.spec import StorageSpec
from kuberlhf_operator import wakeups
from kuberlhf_operator.observe import JobState, Observed
from kuberlhf_operator.reconcile import PipelineMeta
from kuberlhf_operator.storage_probe import probe

LABELS = {"kuberlhf.io/pipeline": "tiny", "kuberlhf.io/stage": "sft", "kuberlhf.io/attempt": "1"}


def job(status: dict, suspend: bool = False) -> dict:
    return {"metadata": {"name": "tiny-sft-1", "labels": LABELS},
            "spec": {"completions": 1, "backoffLimit": 0, "suspend": suspend}, "status": status}


def pod(phase: str = "Pending", waiting: str | None = None, node: str | None = "n1") -> dict:
    statuses = [{"name": "stage", "state": {"waiting": {"reason": waiting}}}] if waiting else []
    return {"metadata": {"name": "tiny-sft-1-x"}, "spec": {"nodeName": node} if node else {},
            "status": {"phase": phase, "containerStatuses": statuses}}


def test_job_events_wake_only_on_phase_suspend_or_deletion_changes() -> None:
    seen = wakeups.ChangeFilter()

    def changed(raw: dict) -> bool:
        key = wakeups.job_key(raw)
        return seen.changed("uid-1", key, first_matters=wakeups.job_first_sight_matters(key))

    assert not changed(job({}))  # ADDED right after the operator created it
    assert not changed(job({"active": 1, "startTime": "t"}))  # the Job controller's bookkeeping
    assert not changed(job({"active": 1, "startTime": "t", "conditions": []}))
    assert changed(job({"active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}))
    assert not changed(job({"succeeded": 1, "completionTime": "t2", "conditions": [
        {"type": "Complete", "status": "True"}]}))
    assert changed(job({}, suspend=True)) is True
    assert seen.forget("uid-1") == ("Running", True, False) and len(seen) == 0
    # Listed at operator start already finished: worth a reconcile at first sight.
    assert wakeups.job_first_sight_matters(wakeups.job_key(job({"failed": 1})))
    assert wakeups.job_key({"metadata": {"name": "x", "labels": {}}}) is None


def test_pod_events_wake_on_running_or_a_reason_to_report() -> None:
    assert not wakeups.pod_first_sight_matters(wakeups.pod_key(pod(node=None)))  # not scheduled yet
    assert not wakeups.pod_first_sight_matters(wakeups.pod_key(pod(waiting="ContainerCreating")))
    assert wakeups.pod_first_sight_matters(wakeups.pod_key(pod(waiting="ImagePullBackOff")))
    assert wakeups.pod_first_sight_matters(wakeups.pod_key(pod("Running")))
    seen = wakeups.ChangeFilter()
    assert not seen.changed("p", wakeups.pod_key(pod(waiting="ContainerCreating")), first_matters=False)
    assert not seen.changed("p", wakeups.pod_key(pod(waiting="ContainerCreating")), first_matters=False)
    assert seen.changed("p", wakeups.pod_key(pod("Running")), first_matters=True)


def test_deployment_events_wake_on_availability() -> None:
    dep = {"metadata": {"name": "tiny-chat"}, "spec": {"replicas": 1}, "status": {}}
    key = wakeups.deployment_key(dep)
    assert not wakeups.deployment_first_sight_matters(key)
    ready = wakeups.deployment_key({**dep, "status": {"readyReplicas": 1, "observedGeneration": 2}})
    assert ready != key and wakeups.deployment_first_sight_matters(ready)


def test_safety_interval_grows_with_the_number_of_pipelines() -> None:
    assert wakeups.safety_interval(1, 60) == 60
    assert wakeups.safety_interval(100, 60) == 60
    assert wakeups.safety_interval(400, 60) == 200  # 400 pipelines: 2 safety reconciles per second in all
    assert wakeups.safety_interval(10_000, 60) == 600
    assert wakeups.safety_interval(3, 5) == 5
    sched = wakeups.Schedule()
    assert sched.due(("ns", "a"), 0.0)  # never reconciled: due
    sched.set(("ns", "a"), 100.0)
    assert not sched.due(("ns", "a"), 99.0) and sched.due(("ns", "a"), 100.0) and len(sched) == 1
    sched.drop(("ns", "a"))
    assert sched.due(("ns", "a"), 0.0) and len(sched) == 0


def test_store_cache_reuses_per_endpoint_and_credentials() -> None:
    cache = wakeups.StoreCache(size=2)
    a = StorageSpec.model_validate({"uri": "s3://b/p", "endpoint": "http://127.0.0.1:9"})
    b = StorageSpec.model_validate({"uri": "s3://other/q", "endpoint": "http://127.0.0.1:9"})
    env1 = {"AWS_ACCESS_KEY_ID": "key-one", "AWS_SECRET_ACCESS_KEY": "secret-one-xyz"}
    env2 = {"AWS_ACCESS_KEY_ID": "key-one", "AWS_SECRET_ACCESS_KEY": "secret-two-xyz"}  # the Secret rotated
    s1 = cache.get(a, env1)
    assert cache.get(b, env1) is s1  # same endpoint and credentials; the bucket is part of each URI
    s2 = cache.get(a, env2)
    assert s2 is not s1 and cache.created == 2
    key = wakeups.store_key(a, env2)
    assert "secret-two-xyz" not in repr(key) and "key-one" not in repr(key)
    other = StorageSpec.model_validate({"uri": "s3://b/p", "endpoint": "http://127.0.0.1:10"})
    cache.get(other, env1)  # evicts the least recently used (env1 on :9 was used before env2)
    assert cache.get(a, env2) is s2 and cache.get(a, env1) is not s1 and cache.created == 4


def test_probe_reuses_one_client_and_skips_the_store_when_nothing_waits(s3_bucket, s3_env, tmp_path: Path) -> None:
    """Real SeaweedFS."""
    stores = wakeups.StoreCache()
    meta = PipelineMeta("tiny", "team", "uid-7")
    spec = {"storage": {"uri": f"{s3_bucket}/runs", "endpoint": s3_env.endpoint, "secretRef": {"name": "s3"}}}
    kube = FakeKube(secret("team", "s3", s3_env.credentials_env()))
    running = Observed(jobs={"tiny-sft-1": JobState("tiny-sft-1", "sft", 1, "Running")})
    assert probe(kube, stores, meta, spec, {}, running) == {}
    assert stores.created == 0  # no stage waits for _COMPLETE: no client at all
    done = Observed(jobs={"tiny-sft-1": JobState("tiny-sft-1", "sft", 1, "Succeeded")})
    for _ in range(3):
        got = probe(kube, stores, meta, spec, {}, done)
        assert not got["sft"].complete and not got["sft"].error
    assert stores.created == 1
