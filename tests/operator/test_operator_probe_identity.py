"""The storage probe never lends the operator's identity to a tenant-chosen endpoint.

With ``spec.storage.secretRef`` the operator reads the bucket with exactly that Secret's keys; without one
(workload identity: the stage pods' ServiceAccount has the bucket rights, the operator has none) it signs
nothing and believes what the succeeded stage pods reported committing in their termination messages."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
from operator_sim import FakeKube, secret

from kuberlhf.contract.stage import StageLayout
from kuberlhf.stages.runtime import completion_report
from kuberlhf_operator.observe import JobState, Observed, reported_digest
from kuberlhf_operator.reconcile import PipelineMeta
from kuberlhf_operator.storage_probe import probe
from kuberlhf_operator.wakeups import StoreCache

META = PipelineMeta("tiny", "team", "uid-1")
LAYOUT = StageLayout(storage_uri="s3://bucket/runs", namespace="team", pipeline="tiny", uid="uid-1")
DIGEST = "ab" * 32


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def _any(self) -> None:
        type(self).seen.append(dict(self.headers))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = _any  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def tenant_endpoint() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """An 'S3 endpoint' a tenant chose: records every request's headers (a signature would name the key)."""
    _Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _Recorder.seen
    finally:
        server.shutdown()


def _pod(stage: str, attempt: int, message: str, exit_code: int = 0, container: str = "trainer") -> dict:
    return {
        "kind": "Pod",
        "metadata": {
            "namespace": "team",
            "name": f"tiny-{stage}-{attempt}-0-x",
            "labels": {
                "kuberlhf.io/pipeline": "tiny",
                "kuberlhf.io/component": "stage",
                "kuberlhf.io/stage": stage,
                "kuberlhf.io/attempt": str(attempt),
            },
        },
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {"name": container, "state": {"terminated": {"exitCode": exit_code, "message": message}}}
            ],
        },
    }


def _succeeded(stage: str = "sft", attempt: int = 1) -> Observed:
    name = f"tiny-{stage}-{attempt}"
    return Observed(jobs={name: JobState(name, stage, attempt, "Succeeded")})


def test_no_secret_ref_never_signs_with_the_operators_credentials(tenant_endpoint, monkeypatch) -> None:
    endpoint, seen = tenant_endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "OPERATOR-OWN-KEY")  # e.g. what IRSA or extraEnv gave the operator
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-own-secret")
    spec = {"storage": {"uri": "s3://bucket/runs", "endpoint": endpoint}}
    report = completion_report("sft", LAYOUT.stage_uri("sft"), DIGEST)
    kube = FakeKube(_pod("sft", 1, report))
    got = probe(kube, StoreCache(), META, spec, {}, _succeeded())
    assert seen == []  # not one request to the tenant's endpoint, signed or not
    assert got["sft"].complete and got["sft"].manifest_sha256 == DIGEST and not got["sft"].error
    assert got["sft"].checkpoint == LAYOUT.stage_uri("sft")
    assert ("get", "Secret") not in kube.calls


def test_secret_ref_signs_with_exactly_the_secrets_keys(tenant_endpoint, monkeypatch) -> None:
    endpoint, seen = tenant_endpoint
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "OPERATOR-OWN-KEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "operator-own-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "operator-session-token")
    spec = {"storage": {"uri": "s3://bucket/runs", "endpoint": endpoint, "secretRef": {"name": "tenant-keys"}}}
    kube = FakeKube(secret("team", "tenant-keys", {"AWS_ACCESS_KEY_ID": "TENANTKEY", "AWS_SECRET_ACCESS_KEY": "t"}))
    got = probe(kube, StoreCache(), META, spec, {}, _succeeded())
    assert not got["sft"].complete
    assert seen, "the probe asked the store"
    for headers in seen:
        auth = headers.get("Authorization", "")
        assert "Credential=TENANTKEY/" in auth, auth
        assert "OPERATOR-OWN-KEY" not in str(headers) and "operator-session-token" not in str(headers)


def test_workload_identity_reports_must_name_this_stage_and_prefix() -> None:
    uri = LAYOUT.stage_uri("sft")
    good = _pod("sft", 1, completion_report("sft", uri, DIGEST))
    assert reported_digest([good], "sft", uri) == DIGEST
    assert reported_digest([good], "reward", uri) is None  # another stage's report
    assert reported_digest([good], "sft", LAYOUT.stage_uri("reward")) is None  # another prefix
    assert reported_digest([_pod("sft", 1, "training log tail\nOOM")], "sft", uri) is None
    assert reported_digest([_pod("sft", 1, completion_report("sft", uri, DIGEST), exit_code=1)], "sft", uri) is None
    assert reported_digest([_pod("sft", 1, completion_report("sft", uri, "not-a-digest"))], "sft", uri) is None
    # a sidecar added through spec.podTemplate does not speak for the stage
    sidecar = _pod("sft", 1, completion_report("sft", uri, DIGEST), container="log-shipper")
    assert reported_digest([sidecar], "sft", uri) is None
    # only the pods of the attempt whose Job succeeded count
    stale = FakeKube(_pod("sft", 1, completion_report("sft", uri, DIGEST)))
    got = probe(stale, StoreCache(), META, {"storage": {"uri": "s3://bucket/runs"}}, {}, _succeeded(attempt=2))
    assert not got["sft"].complete and not got["sft"].error
