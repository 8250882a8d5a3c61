"""What a failed wait prints about a pipeline: its status, its namespace's Events and the operator's log tail."""

from __future__ import annotations

import contextlib

from harness.process_kubelet import ProcessKubelet
from harness.rest import KubeREST


def pipeline_report(api: KubeREST, kubelet: ProcessKubelet, op_ns: str, ns: str, pipeline: str) -> str:
    """The pipeline at API path ``pipeline``: status, every Event in ``ns``, the last 2,500 characters of each
    operator pod's log in ``op_ns``."""
    out = [f"status: {(api.get(pipeline).get('status') or {})}"]
    out += [
        f"event {e['involvedObject']['kind']}/{e['involvedObject']['name']} {e['reason']}: {e['message']}"
        for e in api.get(f"/api/v1/namespaces/{ns}/events")["items"]
    ]
    for p in api.get(f"/api/v1/namespaces/{op_ns}/pods")["items"]:
        with contextlib.suppress(KeyError):
            out.append(kubelet.logs(op_ns, p["metadata"]["name"])[-2500:])
    return "\n".join(out)
