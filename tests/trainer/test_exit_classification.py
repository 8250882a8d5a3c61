"""Pure parts of how a stage ends: exit codes by fault, the launcher's verdict from its workers' codes, the
transient-error retries of the store and the S3 error translation that feeds them."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from kuberlhf.contract.stage import EXIT_INTERRUPTED, EXIT_STORAGE_UNAVAILABLE, EXIT_USER_ERROR
from kuberlhf.stages.errors import StageFailed, StageInterrupted, exit_code_for
from kuberlhf.stages.launch import workers_exit_code
from kuberlhf.stages.runtime import StageInputError, completion_report
from kuberlhf.storage import StorageAuthError, StorageError, StorageTransientError, StorageUnreachableError
from kuberlhf.storage.retry import RetryingStore
from kuberlhf.storage.s3 import S3Backend


def test_exit_codes_by_fault():
    assert len({EXIT_USER_ERROR, EXIT_STORAGE_UNAVAILABLE, EXIT_INTERRUPTED, 0, 1, 2}) == 6
    assert exit_code_for(StorageAuthError("bad keys")) == EXIT_USER_ERROR
    assert exit_code_for(StageInputError("step 1 missing")) == EXIT_USER_ERROR
    assert exit_code_for(ValueError("spec.stages.sft.maxSteps: too small")) == EXIT_USER_ERROR
    assert exit_code_for(StorageUnreachableError("down")) == EXIT_STORAGE_UNAVAILABLE
    assert exit_code_for(StorageTransientError("503")) == EXIT_STORAGE_UNAVAILABLE
    assert exit_code_for(StageInterrupted("SIGTERM")) == EXIT_INTERRUPTED
    assert exit_code_for(StageFailed("worker died", 1)) == 1
    assert exit_code_for(RuntimeError("a bug")) is None  # keeps its traceback, exit 1, retried


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([EXIT_USER_ERROR], EXIT_USER_ERROR),
        ([1, EXIT_USER_ERROR], EXIT_USER_ERROR),
        ([EXIT_STORAGE_UNAVAILABLE, 1], EXIT_STORAGE_UNAVAILABLE),
        ([EXIT_INTERRUPTED], EXIT_INTERRUPTED),
        ([EXIT_INTERRUPTED, -15], EXIT_INTERRUPTED),
        ([EXIT_INTERRUPTED, -9], 1),  # a rank killed before it could checkpoint: a real failure
        ([-11], 1),  # segfault
        ([137], 1),  # OOM-killed
    ],
)
def test_launcher_exit_code_from_workers(codes, expected):
    assert workers_exit_code(codes) == expected


class _Flaky:
    def __init__(self, failures: int, exc: Exception):
        self.calls, self.failures, self.exc = 0, failures, exc
        self.label = "flaky"

    def is_complete(self, uri: str) -> bool:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return True


def test_retrying_store_rides_out_transient_errors_only():
    sleeps: list[float] = []
    flaky = _Flaky(3, StorageUnreachableError("refused"))
    store = RetryingStore(flaky, budget_s=60, sleep=sleeps.append)
    assert store.is_complete("s3://b/x") is True and flaky.calls == 4 and len(sleeps) == 3
    assert store.label == "flaky"  # attributes pass through
    auth = _Flaky(1, StorageAuthError("bad keys"))
    with pytest.raises(StorageAuthError):
        RetryingStore(auth, budget_s=60, sleep=sleeps.append).is_complete("s3://b/x")
    assert auth.calls == 1  # a user error is never retried
    down = _Flaky(10**6, StorageUnreachableError("down"))
    with pytest.raises(StorageUnreachableError):
        RetryingStore(down, budget_s=0, sleep=sleeps.append).is_complete("s3://b/x")


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (503, "SlowDown", StorageTransientError),
        (500, "InternalError", StorageTransientError),
        (502, "", StorageTransientError),
        (403, "AccessDenied", StorageAuthError),
        (400, "InvalidArgument", StorageError),
    ],
)
def test_s3_errors_translate_by_whether_a_retry_can_help(status, code, cls):
    backend = S3Backend(
        endpoint="http://127.0.0.1:1",
        region="us-east-1",
        path_style=True,
        env={"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"},
    )
    err = ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    mapped = backend.translate(err, "uploading")
    assert type(mapped) is cls


def test_completion_report_names_what_was_committed():
    import json

    report = json.loads(completion_report("sft", "s3://b/ns/p/uid/sft", "a" * 64))
    assert report == {"kuberlhf": {"stage": "sft", "checkpoint": "s3://b/ns/p/uid/sft", "manifestSha256": "a" * 64}}
