"""The operator's Kubernetes client: the kubernetes package's ``DynamicClient`` (discovery, paths, auth,
transport, typed API errors) behind the handful of plain-dict calls the operator makes.

Plain dicts because that is what the pure builders return and reconcile reads; ``DynamicClient`` rather than the
generated typed API because the typed models validate against the newest API while the operator must also talk
to old servers (1.20 in the e2e tier). Writes send ``fieldValidation=Strict`` where the server has it (1.25+):
a field the server does not know is an error instead of a silently pruned value; the capability is asked once per
client and cached."""

from __future__ import annotations

import json
import threading
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

from kuberlhf.contract.spec import API_GROUP, API_VERSION

MERGE_PATCH = "application/merge-patch+json"
CONNECTIONS = 32
# fieldValidation=Strict: beta and on by default from 1.25, GA in 1.27.
STRICT_SINCE = (1, 25)
API_VERSIONS = {
    "Job": "batch/v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "Pod": "v1",
    "Secret": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "PodDisruptionBudget": "policy/v1",
    "Event": "v1",
    "RLHFPipeline": f"{API_GROUP}/{API_VERSION}",
}


def load_config() -> client.ApiClient:
    """In-cluster service account when running in a pod, else $KUBECONFIG / ~/.kube/config."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    # kopf's workers and their concurrent creates share one pool of connections: the default (5 per CPU core, 10
    # on 2 cores) is smaller, and every request beyond it pays a new TCP and TLS handshake.
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, CONNECTIONS)
    return client.ApiClient(configuration=cfg)


def _plain(response: Any) -> Any:
    data = response.data
    return json.loads(data) if data else {}


class Kube:
    def __init__(self, api: client.ApiClient | None = None, timeout: float = 30.0,
                 dynamic: DynamicClient | None = None) -> None:
        self._api = api
        self._dynamic: DynamicClient | None = dynamic
        self._lock = threading.Lock()
        self.timeout = timeout
        self._strict: bool | None = None
        self._resources: dict[tuple[str, str | None, str], Any] = {}
        self._resources_lock = threading.Lock()  # discovery mutates the DynamicClient's cache: one lookup at a time

    @property
    def dynamic(self) -> DynamicClient:
        with self._lock:
            if self._dynamic is None:
                self._dynamic = DynamicClient(self._api or load_config())
            return self._dynamic

    def resource(self, kind: str, sub: str | None = None, api_version: str | None = None) -> Any:
        """The API resource of ``kind`` (at ``api_version``, default the one in API_VERSIONS)."""
        dynamic = self.dynamic
        api_version = api_version or API_VERSIONS[kind]
        with self._resources_lock:
            key = (kind, sub, api_version)
            if key not in self._resources:
                res = dynamic.resources.get(api_version=api_version, kind=kind)
                self._resources[key] = res.subresources[sub] if sub else res
            return self._resources[key]

    def strict_writes(self) -> bool:
        """Whether the server takes fieldValidation=Strict (asked once per client)."""
        if self._strict is None:
            self._strict = self.server_version() >= STRICT_SINCE
        return self._strict

    def _write_params(self) -> dict[str, Any]:
        query = [("fieldValidation", "Strict")] if self.strict_writes() else []
        return {"query_params": query, "serialize": False, "_request_timeout": self.timeout}

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _plain(self.dynamic.get(self.resource(kind), name=name, namespace=namespace, serialize=False,
                                           _request_timeout=self.timeout))
        except NotFoundError:
            return None

    def list(self, kind: str, namespace: str, selector: str | None = None) -> list[dict[str, Any]]:
        out = self.dynamic.get(self.resource(kind), namespace=namespace, label_selector=selector, serialize=False,
                               _request_timeout=self.timeout)
        return list(_plain(out).get("items") or [])

    def list_events(self, namespace: str, kind: str, name: str, reason: str) -> list[dict[str, Any]]:
        """core/v1 Events about one object with this reason (the server filters by field selector)."""
        out = self.dynamic.get(self.resource("Event"), namespace=namespace, serialize=False,
                               field_selector=f"involvedObject.kind={kind},involvedObject.name={name},reason={reason}",
                               _request_timeout=self.timeout)
        return list(_plain(out).get("items") or [])

    def create(self, kind: str, namespace: str, body: dict[str, Any]) -> bool:
        """Create; False when it already exists (deterministic names make a repeated create harmless)."""
        try:
            self.dynamic.create(self.resource(kind, api_version=body.get("apiVersion")), body=body, namespace=namespace,
                                **self._write_params())
            return True
        except ConflictError:
            return False

    def patch(self, kind: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        """A JSON merge patch (of the ``sub`` subresource, e.g. status)."""
        return _plain(self.dynamic.patch(self.resource(kind, sub), body=body, name=name, namespace=namespace,
                                         content_type=MERGE_PATCH, **self._write_params()))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        try:
            self.dynamic.delete(self.resource(kind), name=name, namespace=namespace, serialize=False,
                                body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
                                _request_timeout=self.timeout)
            return True
        except NotFoundError:
            return False

    def pod_log_tail(self, namespace: str, pod: str, container: str, lines: int = 20) -> str:
        try:
            resp = self.dynamic.get(self.resource("Pod", "log"), name=pod, namespace=namespace, serialize=False,
                                    query_params=[("container", container), ("tailLines", lines)],
                                    _request_timeout=self.timeout)
        except ApiException:
            return ""  # no kubelet behind the pod, or it is gone: the termination message has to do
        return resp.data.decode("utf-8", "replace")

    def server_version(self) -> tuple[int, int]:
        info = self.dynamic.version["kubernetes"]
        minor = "".join(ch for ch in str(info.get("minor", "0")) if ch.isdigit()) or "0"
        return int(info.get("major", "1")), int(minor)
