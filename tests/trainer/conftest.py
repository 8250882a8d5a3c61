"""Fixtures of the trainer tests: a bucket on the session's SeaweedFS server for this module's pipelines."""

from __future__ import annotations

import uuid
from typing import Any

import pytest


@pytest.fixture(scope="module")
def bucket_storage(s3_server) -> dict[str, Any]:
    name = f"trainer-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(name)
    return {"uri": f"s3://{name}/runs", "endpoint": s3_server.endpoint}
