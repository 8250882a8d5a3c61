"""Kueue: the queue-name and priority-class labels of a pipeline reach its stage Jobs and chat Deployment, a queued
pipeline's Jobs are created suspended, only the queue unsuspends them, and the status says the stage waits for
quota.

Kueue's controller cannot run here (it needs a 1.22+ server with its own CRDs and webhooks; the e2e tier's server
is 1.20, where Job.spec.suspend does not exist). So these tests play the queue in the simulated cluster
(``operator_sim``): the test itself unsuspends a Job to admit it, as Kueue does when the LocalQueue's
ClusterQueue has quota, and suspends it again to preempt it. The 1.20 fallback (a queued Job held at parallelism
0) runs against the real API server and Job controller in tests/e2e/test_security.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
from operator_sim import Cluster, complete

from kuberlhf_operator.manifests import PRIORITY_CLASS_LABEL, QUEUE_NAME_LABEL
from kuberlhf_operator.reconcile import OperatorConfig, PipelineMeta

QUEUE = {QUEUE_NAME_LABEL: "team-a-gpus", PRIORITY_CLASS_LABEL: "research", "team": "a"}


@pytest.fixture()
def queued(meta: PipelineMeta, spec: dict) -> Cluster:
    return Cluster(replace(meta, labels=QUEUE), spec)


def admit(cluster: Cluster, job: str, admitted: bool = True) -> None:
    """What Kueue does to a Job it admits (or preempts): flip spec.suspend."""
    cluster.jobs[job] = replace(cluster.jobs[job], suspended=not admitted)


def test_a_queued_pipeline_creates_suspended_jobs_with_the_queue_labels(queued: Cluster) -> None:
    queued.step()
    job = queued.bodies[("Job", "tiny-sft-1")]
    assert job["spec"]["suspend"] is True
    labels = job["metadata"]["labels"]
    assert labels[QUEUE_NAME_LABEL] == "team-a-gpus" and labels[PRIORITY_CLASS_LABEL] == "research"
    assert "team" not in labels  # only the documented labels are propagated
    # on the Job only: Kueue's pod integration would otherwise also try to queue the Job's pods
    assert QUEUE_NAME_LABEL not in job["spec"]["template"]["metadata"]["labels"]
    d = queued.step()
    assert (queued.status["phase"], queued.status["reason"]) == ("Queued", "WaitingForQuota")
    assert queued.status["stages"]["sft"]["phase"] == "Queued"
    assert "LocalQueue 'team-a-gpus'" in queued.status["message"]
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "Queued")]
    d = queued.step()
    assert d.actions == [] and d.events == []  # the operator never unsuspends it, nor repeats the event


def test_admission_runs_the_stage_and_preemption_queues_it_again(queued: Cluster) -> None:
    queued.step()
    queued.step()
    admit(queued, "tiny-sft-1")
    queued.run_pods("tiny-sft-1")
    queued.step()
    assert queued.status["phase"] == "Running" and queued.status["stages"]["sft"]["phase"] == "Running"
    admit(queued, "tiny-sft-1", admitted=False)  # preempted by a higher-priority workload
    queued.pods.pop("tiny-sft-1")
    d = queued.step()
    assert d.actions == [] and queued.status["phase"] == "Queued"
    admit(queued, "tiny-sft-1")
    queued.finish("tiny-sft-1")
    queued.step(complete("sft"))
    assert queued.bodies[("Job", "tiny-reward-1")]["spec"]["suspend"] is True  # the next stage queues too


def test_spec_suspend_of_a_queued_pipeline_deletes_the_job_instead_of_fighting_the_queue(queued: Cluster) -> None:
    queued.step()
    admit(queued, "tiny-sft-1")
    queued.run_pods("tiny-sft-1")
    queued.step()
    queued.spec["suspend"] = True
    d = queued.step()
    assert [(a.verb, a.kind, a.name) for a in d.actions] == [("delete", "Job", "tiny-sft-1")]
    assert queued.status["phase"] == "Suspended"
    queued.spec["suspend"] = False
    queued.pods.clear()
    d = queued.step()
    created = [a for a in d.actions if a.verb == "create" and a.kind == "Job"]
    assert [a.name for a in created] == ["tiny-sft-1"] and created[0].body["spec"]["suspend"] is True
    assert not any(a.verb == "patch" for a in d.actions)


def test_without_a_queue_jobs_start_unsuspended(cluster: Cluster) -> None:
    cluster.step()
    job = cluster.bodies[("Job", "tiny-sft-1")]
    assert job["spec"]["suspend"] is False and QUEUE_NAME_LABEL not in job["metadata"]["labels"]


def test_the_chat_deployment_and_its_pods_carry_the_queue_labels(queued: Cluster) -> None:
    for stage in ("sft", "reward", "ppo"):
        queued.step()
        admit(queued, f"tiny-{stage}-1")
        queued.finish(f"tiny-{stage}-1")
        queued.step(complete(stage))
    dep = queued.bodies[("Deployment", "tiny-chat")]
    for labels in (dep["metadata"]["labels"], dep["spec"]["template"]["metadata"]["labels"]):
        assert labels[QUEUE_NAME_LABEL] == "team-a-gpus" and labels[PRIORITY_CLASS_LABEL] == "research"
    assert QUEUE_NAME_LABEL not in dep["spec"]["selector"]["matchLabels"]  # the selector stays the operator's


def test_a_server_without_job_suspend_holds_a_queued_job_at_parallelism_zero(meta: PipelineMeta, spec: dict) -> None:
    """Before 1.22 (the e2e tier's 1.20) there is no Job.spec.suspend, and so no Kueue: a queued stage's Job is held
    at parallelism 0 (the Job controller creates no pod; tests/e2e/test_security.py shows it on the real server)
    instead of running past the queue's quota; setting parallelism admits it and the operator never undoes that."""
    cluster = Cluster(replace(meta, labels=QUEUE), spec, OperatorConfig(job_suspend_supported=False))
    cluster.step()
    job = cluster.bodies[("Job", "tiny-sft-1")]
    assert "suspend" not in job["spec"] and job["spec"]["parallelism"] == 0 and job["spec"]["completions"] == 1
    assert job["metadata"]["labels"][QUEUE_NAME_LABEL] == "team-a-gpus"
    d = cluster.step()
    assert (cluster.status["phase"], cluster.status["reason"]) == ("Queued", "WaitingForQuota")
    assert "parallelism 0" in cluster.status["message"] and "spec.parallelism" in cluster.status["message"]
    assert [(e.type, e.reason) for e in d.events] == [("Normal", "Queued")]
    admit(cluster, "tiny-sft-1")  # what the admitting party does here: spec.parallelism = completions
    cluster.run_pods("tiny-sft-1")
    d = cluster.step()
    assert d.actions == [] and cluster.status["phase"] == "Running"


def test_without_a_queue_an_old_server_gets_a_runnable_job(meta: PipelineMeta, spec: dict) -> None:
    cluster = Cluster(meta, spec, OperatorConfig(job_suspend_supported=False))
    cluster.step()
    job = cluster.bodies[("Job", "tiny-sft-1")]
    assert "suspend" not in job["spec"] and job["spec"]["parallelism"] == job["spec"]["completions"] == 1
