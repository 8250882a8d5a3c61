"""A real Kubernetes control plane on loopback for the e2e tier: etcd + kube-apiserver + kube-controller-manager.

No Docker engine runs here (so no kind), but the real binaries do: ``hack/build-control-plane.sh`` builds
kube-apiserver and kube-controller-manager v1.20.2 from Debian's source package into
``$KUBERLHF_CACHE/k8s-v1.20.2`` and etcd comes from Debian. There is no scheduler and no kubelet: pods stay
Pending unless :class:`harness.process_kubelet.ProcessKubelet` runs them.

Everything listens on 127.0.0.1 on free ports and lives in one temporary directory, so several control planes
(a session and its CI) can run side by side. Authentication is a static token file (an admin token in
``system:masters``) plus service-account tokens; authorization is Node + RBAC, so a service account has only
what its (Cluster)Role bindings give it: that is what lets the e2e tests run the operator under the chart's RBAC.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

K8S_VERSION = "1.20.2"
SETUP_HINT = "run `bash hack/setup.sh --test` (builds them once, 10-18 min, cached in ~/.cache/kuberlhf)"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# What the controller-manager runs: enough for Jobs, Deployments, service-account tokens, ownerReference GC and
# ResourceQuota usage (the quota admission refuses nothing until this controller fills a quota's status).
CONTROLLERS = (
    "garbagecollector",
    "job",
    "deployment",
    "replicaset",
    "serviceaccount",
    "serviceaccount-token",
    "namespace",
    "resourcequota",
)


class ControlPlaneUnavailable(RuntimeError):
    """The binaries are missing or a component did not come up; the message says what to do."""


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd[1:]))} failed ({self.returncode}): {self.stderr.strip()}"


def cache_dir() -> Path:
    return Path(os.environ.get("KUBERLHF_CACHE") or Path.home() / ".cache" / "kuberlhf")


@dataclass(frozen=True)
class Binaries:
    etcd: str
    kube_apiserver: str
    kube_controller_manager: str
    kubectl: str | None


def find_binaries(bin_dir: str | os.PathLike[str] | None = None) -> Binaries:
    """Locate the binaries without building anything (a build takes 10-18 min: that is setup's job)."""
    kdir = Path(bin_dir or os.environ.get("KUBERLHF_K8S_BIN") or cache_dir() / f"k8s-v{K8S_VERSION}")
    missing = [str(kdir / b) for b in ("kube-apiserver", "kube-controller-manager") if not os.access(kdir / b, os.X_OK)]
    etcd = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else None)
    if etcd is None:
        missing.append("etcd (Debian package etcd-server)")
    if missing:
        raise ControlPlaneUnavailable(f"control-plane binaries not found: {', '.join(missing)}; {SETUP_HINT}")
    return Binaries(
        etcd=etcd,
        kube_apiserver=str(kdir / "kube-apiserver"),
        kube_controller_manager=str(kdir / "kube-controller-manager"),
        kubectl=shutil.which("kubectl"),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubeconfig_dict(server: str, ca_pem: bytes, token: str, user: str = "admin", namespace: str = "default") -> dict:
    """A kubeconfig with one cluster, one token user and one current context (pure)."""
    ctx = f"{user}@kuberlhf-test"
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "kuberlhf-test", "cluster": {"server": server, "certificate-authority-data": base64.b64encode(ca_pem).decode()}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": ctx, "context": {"cluster": "kuberlhf-test", "user": user, "namespace": namespace}}],
        "current-context": ctx,
    }


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> None:
    """CA, apiserver serving cert (loopback + in-cluster names) and the service-account signing key pair."""
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
             "-subj", "/CN=kuberlhf-test-ca", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver", cwd=d)
    sans = ",".join(
        ["IP:127.0.0.1", "IP:10.0.0.1", "DNS:localhost", "DNS:kubernetes", "DNS:kubernetes.default",
         "DNS:kubernetes.default.svc", "DNS:kubernetes.default.svc.cluster.local"]
    )
    (d / "san.ext").write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext", cwd=d)
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)


def etcd_argv(etcd: str, data_dir: Path, client_port: int) -> list[str]:
    """A single-member etcd on loopback (pure)."""
    peer = free_port()
    return [
        etcd, "--name", "default", "--data-dir", str(data_dir),
        "--listen-client-urls", f"http://127.0.0.1:{client_port}",
        "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"default=http://127.0.0.1:{peer}",
        "--quota-backend-bytes", str(2 * 1024**3), "--log-level", "warn",
    ]


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    """Start a component in its own process group, output to ``log_path``."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def kill_all(procs: dict[str, subprocess.Popen]) -> None:
    """Kill every component (reverse start order) and wait for them. SIGKILL: the state is throwaway, and a
    graceful apiserver shutdown costs seconds of every test session."""
    for name in reversed(list(procs)):
        proc = procs[name]
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs.values():
        proc.wait()
    procs.clear()


class Components:
    """Processes started by ``start()`` into ``self._procs`` (logs in ``self.logs``), killed by ``stop()``; a
    context manager. The base of ControlPlane and harness.apiextensions.ExtensionsServer (dataclasses defining
    ``_procs``, ``logs`` and ``start``)."""

    _procs: dict[str, subprocess.Popen]
    logs: Path

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        kill_all(self._procs)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, component: str, lines: int = 40) -> str:
        path = self.logs / f"{component}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def _spawn(self, name: str, argv: list[str]) -> None:
        self._procs[name] = spawn(argv, self.logs / f"{name}.log")


@dataclass
class ControlPlane(Components):
    """etcd + kube-apiserver + kube-controller-manager in ``workdir``. Use as a context manager or start()/stop()."""

    workdir: Path
    bin_dir: str | None = None
    controllers: tuple[str, ...] = CONTROLLERS
    verbosity: int = 0
    server: str = ""
    admin_token: str = ""
    kubeconfig: Path = field(default=Path())
    start_seconds: float = 0.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    # --- lifecycle -----------------------------------------------------------------------------------
    # A deadline only: at load 20 (niced tests beside benchmarks) etcd + kube-apiserver took over 90 s to be ready.
    def start(self, timeout: float = 180.0) -> ControlPlane:
        t0 = time.monotonic()
        self.bins = find_binaries(self.bin_dir)
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.pki = self.workdir / "pki"
        make_pki(self.pki)
        self.logs = self.workdir / "logs"
        self.logs.mkdir(exist_ok=True)
        self.admin_token = secrets.token_hex(16)
        # token,user,uid,"groups": system:masters is bound to cluster-admin by the bootstrap RBAC policy
        (self.workdir / "tokens.csv").write_text(f'{self.admin_token},admin,admin,"system:masters"\n')

        etcd_client, api_port = free_port(), free_port()
        self._spawn("etcd", etcd_argv(self.bins.etcd, self.workdir / "etcd", etcd_client))
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn("kube-apiserver", [
            self.bins.kube_apiserver,
            f"--etcd-servers=http://127.0.0.1:{etcd_client}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}", "--insecure-port=0",
            f"--cert-dir={self.pki}",
            f"--tls-cert-file={self.pki / 'apiserver.crt'}", f"--tls-private-key-file={self.pki / 'apiserver.key'}",
            f"--client-ca-file={self.pki / 'ca.crt'}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-key-file={self.pki / 'sa.pub'}",
            f"--service-account-signing-key-file={self.pki / 'sa.key'}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--allow-privileged=true",
            # As on managed clusters: setting blockOwnerDeletion needs `update` on the owner's finalizers, so the
            # e2e tier checks that the chart's RBAC grants what the operator's children need.
            "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
            # one machine, 2 cores: the flow-control queues and profiling only cost CPU here
            "--enable-priority-and-fairness=false", "--profiling=false",
            f"--v={self.verbosity}",
        ])
        self._write_kubeconfig()
        self._wait_ready(t0 + timeout)
        self._spawn("kube-controller-manager", [
            self.bins.kube_controller_manager,
            f"--kubeconfig={self.kubeconfig}",
            f"--controllers={','.join(self.controllers)}",
            f"--root-ca-file={self.pki / 'ca.crt'}",
            f"--service-account-private-key-file={self.pki / 'sa.key'}",
            "--leader-elect=false", "--port=0", "--secure-port=0",
            "--concurrent-gc-syncs=5", "--profiling=false",
            f"--v={self.verbosity}",
        ])
        self._wait_default_service_account(t0 + timeout)
        self.start_seconds = time.monotonic() - t0
        return self

    # --- helpers for tests ---------------------------------------------------------------------------
    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    def write_kubeconfig(self, path: Path, token: str, user: str, namespace: str = "default") -> Path:
        """A kubeconfig for any bearer token (e.g. a service account's, to act with exactly its RBAC)."""
        import yaml

        cfg = kubeconfig_dict(self.server, self.ca_file.read_bytes(), token, user=user, namespace=namespace)
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o600)
        return path

    def api_client(self, kubeconfig: Path | None = None) -> Any:
        """A `kubernetes` python client ApiClient for the admin (or the given kubeconfig)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def kubectl(self, *args: str, input: str | None = None, kubeconfig: Path | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess:
        if not self.bins.kubectl:
            raise ControlPlaneUnavailable("kubectl not found on PATH; " + SETUP_HINT)
        proc = subprocess.run(
            [self.bins.kubectl, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def service_account_token(self, namespace: str, name: str, timeout: float = 30) -> str:
        """The token of a service account (v1.20: the token controller's Secret, created asynchronously)."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in core.list_namespaced_secret(namespace).items:
                ann = s.metadata.annotations or {}
                is_token = s.type == "kubernetes.io/service-account-token" and s.data and s.data.get("token")
                if is_token and ann.get("kubernetes.io/service-account.name") == name:
                    return base64.b64decode(s.data["token"]).decode()
            time.sleep(0.3)
        raise TimeoutError(f"no token Secret for service account {namespace}/{name} after {timeout}s")

    def alive(self) -> bool:
        return bool(self._procs) and all(p.poll() is None for p in self._procs.values())

    # --- internals -----------------------------------------------------------------------------------
    def _write_kubeconfig(self) -> None:
        self.kubeconfig = self.write_kubeconfig(self.workdir / "admin.kubeconfig", self.admin_token, "admin")

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise ControlPlaneUnavailable(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def _get(self, path: str) -> tuple[int, bytes]:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(self.server + path, headers={"Authorization": f"Bearer {self.admin_token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait_ready(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                code, body = self._get("/readyz")
                if code == 200:
                    return
                last = body.decode(errors="replace")[-500:]
            except (OSError, ssl.SSLError) as e:
                last = str(e)
            time.sleep(0.3)
        raise ControlPlaneUnavailable(f"kube-apiserver not ready: {last}\n{self.log_tail('kube-apiserver')}")

    def _wait_default_service_account(self, deadline: float) -> None:
        # Pods need the namespace's `default` service account and its token Secret (ServiceAccount admission).
        while time.monotonic() < deadline:
            self._check_alive()
            code, body = self._get("/api/v1/namespaces/default/serviceaccounts/default")
            if code == 200 and json.loads(body).get("secrets"):
                return
            time.sleep(0.3)
        raise ControlPlaneUnavailable("the controller-manager created no default service account:\n"
                                      + self.log_tail("kube-controller-manager"))
