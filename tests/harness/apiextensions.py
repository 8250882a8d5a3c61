"""A current Kubernetes API server for CRDs on loopback: etcd + apiextensions-apiserver (the CRD tier).

``hack/build-apiextensions.sh`` builds apiextensions-apiserver of the current Kubernetes release from Debian
unstable's packages into ``$KUBERLHF_CACHE/apiextensions-v<version>``; etcd is Debian's. It serves CRDs and custom
resources with everything a current server does to them (CEL rules, ``fieldValidation=Strict``, server-side
apply, structural defaulting and pruning), and nothing else: no core API, no Jobs, no controllers.

Wiring, as for the 1.20 control plane (``harness.controlplane``): loopback ports, one temporary directory, our
own CA. A generic API server delegates authentication and authorization to a "core" server and lists its
admission inputs there; there is none, so its kubeconfigs point at itself, the admin authenticates by a client
certificate in ``system:masters`` (always allowed, so no SubjectAccessReview is needed), and the admission
plugins that need core objects (namespaces, webhook and policy configurations) are off. That also leaves its
``informer-sync`` readiness check failing for good, so readiness here is "the CRD API answers".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.controlplane import (
    Components,
    ControlPlaneUnavailable,
    _openssl,
    cache_dir,
    etcd_argv,
    free_port,
    make_pki,
)
from harness.rest import ApiError, KubeREST

SETUP_HINT = "run `bash hack/setup.sh --test` (builds it once, ~5-12 min, cached in ~/.cache/kuberlhf)"
CORE_ADMISSION = (
    "NamespaceLifecycle,MutatingAdmissionPolicy,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,"
    "ValidatingAdmissionWebhook"
)


def find_apiextensions(bin_dir: str | os.PathLike[str] | None = None) -> Path:
    """The newest cached apiextensions-apiserver (building it is setup's job)."""
    bin_dir = bin_dir or os.environ.get("KUBERLHF_APIEXTENSIONS_BIN")
    dirs = [Path(bin_dir)] if bin_dir else sorted(cache_dir().glob("apiextensions-v*"), key=_version_key)
    for d in reversed(dirs):
        if os.access(d / "apiextensions-apiserver", os.X_OK):
            return d / "apiextensions-apiserver"
    raise ControlPlaneUnavailable(f"apiextensions-apiserver not found under {cache_dir()}; {SETUP_HINT}")


def _version_key(path: Path) -> tuple[int, ...]:
    digits = path.name.removeprefix("apiextensions-v").split(".")
    return tuple(int(d) if d.isdigit() else -1 for d in digits)


def make_admin_cert(pki: Path) -> tuple[str, str]:
    """A client certificate for user admin in group system:masters, signed by the CA of ``make_pki``."""
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "admin.key",
        "-out",
        "admin.csr",
        "-subj",
        "/O=system:masters/CN=admin",
        cwd=pki,
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        "admin.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "admin.crt",
        "-days",
        "3650",
        "-extfile",
        "client.ext",
        cwd=pki,
    )
    return str(pki / "admin.crt"), str(pki / "admin.key")


@dataclass
class ExtensionsServer(Components):
    """etcd + apiextensions-apiserver in ``workdir``. Use as a context manager."""

    workdir: Path
    bin_dir: str | None = None
    server: str = ""
    version: str = ""
    start_seconds: float = 0.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, timeout: float = 90.0) -> ExtensionsServer:
        t0 = time.monotonic()
        binary = find_apiextensions(self.bin_dir)
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = self.workdir / "pki"
        make_pki(self.pki)
        self.client_cert = make_admin_cert(self.pki)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        etcd_client, port = free_port(), free_port()
        self.server = f"https://127.0.0.1:{port}"
        kubeconfig = self.workdir / "self.kubeconfig"
        kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: self\n"
            f"clusters: [{{name: self, cluster: {{server: '{self.server}', certificate-authority: '{self.pki}/ca.crt'}}}}]\n"
            f"users: [{{name: admin, user: {{client-certificate: '{self.client_cert[0]}', "
            f"client-key: '{self.client_cert[1]}'}}}}]\n"
            "contexts: [{name: self, context: {cluster: self, user: admin}}]\n"
        )
        self._spawn("etcd", etcd_argv(etcd, self.workdir / "etcd", etcd_client))
        self._spawn(
            "apiextensions-apiserver",
            [
                str(binary),
                f"--etcd-servers=http://127.0.0.1:{etcd_client}",
                "--bind-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={self.pki / 'apiserver.crt'}",
                f"--tls-private-key-file={self.pki / 'apiserver.key'}",
                f"--client-ca-file={self.pki / 'ca.crt'}",
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--authentication-skip-lookup",
                f"--disable-admission-plugins={CORE_ADMISSION}",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
            ],
        )
        self.api = KubeREST(self.server, "", (self.pki / "ca.crt").read_bytes(), client_cert=self.client_cert)
        self._wait_ready(t0 + timeout)
        self.version = self.api.get("/version")["gitVersion"]
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ControlPlaneUnavailable(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                self.api.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
                return
            except (ApiError, OSError) as e:
                last = str(e)
            time.sleep(0.3)
        raise ControlPlaneUnavailable(
            f"apiextensions-apiserver not ready: {last}\n{self.log_tail('apiextensions-apiserver')}"
        )


def operator_kube(server: ExtensionsServer) -> Any:
    """The operator's own client (``kuberlhf_operator.kube.Kube``) on this server.

    apiextensions-apiserver alone serves no ``/apis`` group list (in a cluster the kube-aggregator in front of it
    does), which the ``DynamicClient``'s discovery reads first; here the two groups it serves are named instead,
    and each group's resources are still discovered from the server itself."""
    from kubernetes import config
    from kubernetes.dynamic import DynamicClient
    from kubernetes.dynamic.discovery import LazyDiscoverer, ResourceGroup

    from kuberlhf.contract.spec import API_GROUP, API_VERSION
    from kuberlhf_operator.kube import Kube

    class ServedGroups(LazyDiscoverer):
        def parse_api_groups(self, request_resources: bool = False, update: bool = False) -> dict[str, Any]:
            if not self._cache.get("resources") or update:
                served = {"apiextensions.k8s.io": "v1", API_GROUP: API_VERSION}
                self._cache["resources"] = {"apis": {g: {v: ResourceGroup(True)} for g, v in served.items()}}
            return self._cache["resources"]

    api = config.new_client_from_config(config_file=str(server.workdir / "self.kubeconfig"))
    return Kube(
        api, dynamic=DynamicClient(api, cache_file=str(server.workdir / "discovery.json"), discoverer=ServedGroups)
    )
