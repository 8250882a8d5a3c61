"""A minimal Kubernetes REST client (plain JSON dicts, bearer token) for the harness.

The harness works on the API's own JSON (camelCase), which the pure functions in ``podspec`` take; the official
client's models would only be converted back. Watches are streamed line by line.
"""

from __future__ import annotations

import base64
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml


class ApiError(RuntimeError):
    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else str(body)[:300]
        super().__init__(f"{method} {path}: HTTP {status}: {msg}")


class KubeREST:
    def __init__(self, server: str, token: str, ca_pem: bytes, client_cert: tuple[str, str] | None = None) -> None:
        """A bearer ``token``, or "" and ``client_cert`` (cert file, key file) to authenticate by certificate."""
        self.server = server.rstrip("/")
        self.token = token
        self.ca_pem = ca_pem
        self.ssl = ssl.create_default_context(cadata=ca_pem.decode())
        if client_cert:
            self.ssl.load_cert_chain(*client_cert)

    @classmethod
    def from_kubeconfig(cls, path: str | Path) -> KubeREST:
        cfg = yaml.safe_load(Path(path).read_text())
        ctx_name = cfg["current-context"]
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        return cls(cluster["server"], user["token"], base64.b64decode(cluster["certificate-authority-data"]))

    def _open(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
              query: dict[str, Any] | None = None, timeout: float = 30):
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if data is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(req, context=self.ssl, timeout=timeout)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed: Any = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise ApiError(e.code, parsed, method, path) from None

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        with self._open(method, path, body, content_type, query, timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else {}

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        return self.request("GET", path, query=query or None)

    def names(self, ns: str, paths: Sequence[str], **query: Any) -> list[str]:
        """``<resource>/<name>`` of every object each list path in ``paths`` (a template with ``{ns}``) returns,
        e.g. a pipeline's children by its label."""
        out: list[str] = []
        for path in paths:
            items = self.get(path.format(ns=ns), **query)["items"]
            out += [f"{path.rsplit('/', 1)[1]}/{o['metadata']['name']}" for o in items]
        return out

    def post(self, path: str, body: Any) -> dict[str, Any]:
        return self.request("POST", path, body)

    def merge_patch(self, path: str, body: Any) -> dict[str, Any]:
        return self.request("PATCH", path, body, content_type="application/merge-patch+json")

    def apply(self, path: str, body: Any, field_manager: str, **query: Any) -> dict[str, Any]:
        """Server-side apply (the body is JSON, which is YAML)."""
        return self.request("PATCH", path, body, content_type="application/apply-patch+yaml",
                            query={"fieldManager": field_manager, **query})

    def delete(self, path: str, body: Any = None) -> dict[str, Any]:
        return self.request("DELETE", path, body)

    def watch(self, path: str, resource_version: str, timeout_seconds: int = 60) -> Iterator[dict[str, Any]]:
        """Events of one watch request until the server ends it (after timeout_seconds)."""
        query = {"watch": "true", "resourceVersion": resource_version, "timeoutSeconds": timeout_seconds}
        with self._open("GET", path, query=query, timeout=timeout_seconds + 30) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)
