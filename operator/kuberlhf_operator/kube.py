"""A small JSON-in/JSON-out Kubernetes REST client on top of ``kubernetes.client.ApiClient``.

The generated typed API (kubernetes>=35) validates bodies and responses against pydantic models of the newest
API; the operator deals in plain dicts (what the pure builders return, what reconcile reads) and must talk to
old servers too (1.20 in the e2e tier), so it uses the client only for configuration, auth and transport."""

from __future__ import annotations

import json
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kuberlhf.contract.spec import API_GROUP, API_VERSION, PLURAL

MERGE_PATCH = "application/merge-patch+json"
# fieldValidation=Strict (beta and on by default from 1.25, GA 1.27): an unknown or duplicate field in what the
# operator writes is an error instead of being pruned. Older servers ignore or lack it, so it is sent only there.
STRICT_SINCE = (1, 25)
_PATHS = {
    "Job": "/apis/batch/v1/namespaces/{ns}/jobs",
    "Service": "/api/v1/namespaces/{ns}/services",
    "Deployment": "/apis/apps/v1/namespaces/{ns}/deployments",
    "Pod": "/api/v1/namespaces/{ns}/pods",
    "Secret": "/api/v1/namespaces/{ns}/secrets",
    "Event": "/api/v1/namespaces/{ns}/events",
    "RLHFPipeline": f"/apis/{API_GROUP}/{API_VERSION}/namespaces/{{ns}}/{PLURAL}",
}


def load_config() -> client.ApiClient:
    """In-cluster service account when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(configuration=cfg)


class Kube:
    def __init__(self, api: client.ApiClient | None = None, timeout: float = 30.0) -> None:
        self._api = api
        self._lock = threading.Lock()
        self.timeout = timeout
        self._strict: bool | None = None  # detected on the first write, then cached

    def strict_writes(self) -> bool:
        """Whether the server takes fieldValidation=Strict (asked once per client)."""
        if self._strict is None:
            self._strict = self.server_version() >= STRICT_SINCE
        return self._strict

    def _write_query(self) -> dict[str, Any] | None:
        return {"fieldValidation": "Strict"} if self.strict_writes() else None

    @property
    def api(self) -> client.ApiClient:
        with self._lock:
            if self._api is None:
                self._api = load_config()
            return self._api

    def request(self, method: str, path: str, *, query: dict[str, Any] | None = None, body: Any = None,
                content_type: str = "application/json", raw: bool = False) -> Any:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        _method, url, hdrs, ser_body, _post = self.api.param_serialize(
            method=method, resource_path=path, query_params=[(k, v) for k, v in (query or {}).items()],
            header_params=headers, body=body, auth_settings=["BearerToken"])
        resp = self.api.call_api(method, url, header_params=hdrs, body=ser_body, _request_timeout=self.timeout)
        resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException(http_resp=resp)
        text = resp.data.decode("utf-8") if resp.data else ""
        if raw:
            return text
        return json.loads(text) if text else {}

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        p = _PATHS[kind].format(ns=namespace)
        if name:
            p += f"/{name}"
        if sub:
            p += f"/{sub}"
        return p

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        query = {"labelSelector": selector} if selector else None
        return list(self.request("GET", self.path(kind, namespace), query=query).get("items") or [])

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        """Create; False when it already exists (deterministic names make a repeated create harmless)."""
        try:
            self.request("POST", self.path(kind, namespace), body=body, query=self._write_query())
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        return self.request("PATCH", self.path(kind, namespace, name, sub), body=body, content_type=MERGE_PATCH,
                            query=self._write_query())

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            self.request("DELETE", self.path(kind, namespace, name),
                         body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int = 20) -> str:
        try:
            return self.request("GET", self.path("Pod", namespace, pod, "log"),
                                query={"container": container, "tailLines": lines}, raw=True)
        except ApiException:
            return ""  # no kubelet behind the pod, or it is gone: the termination message has to do

    def server_version(self) -> tuple[int, int]:
        info = self.request("GET", "/version")
        minor = "".join(ch for ch in str(info.get("minor", "0")) if ch.isdigit()) or "0"
        return int(info.get("major", "1")), int(minor)
