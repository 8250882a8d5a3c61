"""The "process kubelet": stands in for nodes so the whole system runs end to end on one machine.

It watches Pods through the real API server, binds unscheduled ones to its node (there is no scheduler), runs each
container's command + args as a local process (the image is ignored: the `kuberlhf` executable of this virtualenv
plays every image), and writes Pod status back (Running, Ready from the readiness probe, Succeeded/Failed with
exit code and termination message). Each container's output goes to a log file; nothing is served (no
`kubectl logs`/`exec`): use :meth:`ProcessKubelet.logs`.

Substitutions, because nothing real can run them here (each one documented where it happens):
- Cluster DNS: a Service name (`<job>-0.<svc>`, `<svc>.<ns>.svc[.cluster.local]`, a Service URL) in env or args
  becomes 127.0.0.1, since every pod shares this machine's network.
- Ports: each declared containerPort gets a free local port (`--port N`, `--port=N` args and `*PORT` env vars
  equal to N are rewritten; the map is in the pod annotation ``process-kubelet.kuberlhf.io/ports``), and the
  rendezvous MASTER_PORT gets a free port per rendezvous: one shared by the pods of a Job that meet at a Service
  address, one per pod when MASTER_ADDR is loopback (a pod's own network on a cluster), so parallel pipelines and
  tests never collide. No port is handed out twice.
- v1.20 Jobs have no completion index: a Job-owned pod gets the lowest free index of its Job, written to the
  ``batch.kubernetes.io/job-completion-index`` annotation (so downward-API fieldRefs resolve as on a current
  cluster) and to env JOB_COMPLETION_INDEX (as current Kubernetes injects it).
- Volumes are not mounted; the container's working directory is a per-pod temporary directory.
- /dev/termination-log cannot exist here: each container gets env KUBERLHF_TERMINATION_LOG naming a file in the
  pod's directory (the stage writes its completion report there instead); as on a kubelet, the file's content
  is the termination message, else on failure the log's tail (FallbackToLogsOnError).
- Scheduling: the kubelet binds pods itself, and only when the pod's nodeSelector matches its Node's labels (as
  read from the API server, so a test can `kubectl label node process-kubelet ...`); until then the pod stays
  Pending with PodScheduled=False, reason Unschedulable and the scheduler's message, re-checked every second.
  Resource requests (nvidia.com/gpu), affinity and taints are not checked.
- Probes run from the first second (initialDelaySeconds ignored); liveness probes are not run.
- The pod env starts from the test process's env (PATH, HOME, offline-hub settings) minus KUBECONFIG and AWS
  credentials, so a pod only has credentials its spec gives it.
- The service-account token volume (/var/run/secrets/kubernetes.io/serviceaccount) becomes env KUBECONFIG:
  a kubeconfig in the pod's directory with the token of the pod's ServiceAccount (unless
  automountServiceAccountToken is false). So a controller pod (the chart's operator Deployment) talks to the
  API server with exactly its RBAC, as in a cluster.

Killing a pod's process (:meth:`ProcessKubelet.kill_pod`) is a pod failure (exit 137), as a node would report it.
Reusable as a thread (``with ProcessKubelet(kubeconfig, workdir): ...``) or a process
(``python -m harness.process_kubelet --kubeconfig FILE --workdir DIR``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness import podspec
from harness.rest import ApiError, KubeREST

log = logging.getLogger("process-kubelet")

PORTS_ANNOTATION = "process-kubelet.kuberlhf.io/ports"
NODE_NAME = "process-kubelet"
# What the pods must not inherit from the test process: they get credentials only from their spec.
SCRUBBED_ENV = ("KUBECONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PYTEST_CURRENT_TEST")
MAX_GRACE_SECONDS = 5.0  # tests cannot wait the default 30 s for a pod to stop


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ContainerRun:
    name: str
    spec: dict[str, Any]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    message: str = ""
    restart_count: int = 0
    ready: bool = False
    waiting_reason: str | None = "ContainerCreating"
    waiting_message: str = ""
    next_restart: float = 0.0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def termination_log(self) -> Path:
        """The file standing in for the container's /dev/termination-log."""
        return self.log_path.with_suffix(".termination-log")

    def status(self, image: str) -> dict[str, Any]:
        st: dict[str, Any] = {
            "name": self.name,
            "image": image,
            "imageID": "",
            "ready": self.ready and self.running,
            "restartCount": self.restart_count,
            "started": self.running,
        }
        if self.proc is not None:
            st["containerID"] = f"process://{self.proc.pid}"
        if self.running:
            st["state"] = {"running": {"startedAt": self.started_at}}
        elif self.exit_code is not None and self.waiting_reason is None:
            st["state"] = {"terminated": {
                "exitCode": self.exit_code, "reason": "Completed" if self.exit_code == 0 else "Error",
                "message": self.message, "startedAt": self.started_at, "finishedAt": self.finished_at,
            }}
        else:
            st["state"] = {"waiting": {"reason": self.waiting_reason or "ContainerCreating", "message": self.waiting_message}}
        return st


@dataclass
class PodRun:
    namespace: str
    name: str
    uid: str
    pod: dict[str, Any]
    workdir: Path
    ports: dict[int, int] = field(default_factory=dict)
    containers: list[ContainerRun] = field(default_factory=list)
    phase: str = "Pending"
    start_time: str | None = None
    completion_index: int | None = None
    job_uid: str | None = None
    delete_requested: threading.Event = field(default_factory=threading.Event)
    gone: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    disruption: dict[str, Any] | None = None  # the DisruptionTarget condition of an evicted pod (evict_pod)

    @property
    def labels(self) -> dict[str, str]:
        return (self.pod.get("metadata") or {}).get("labels") or {}

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.containers if c.running and c.proc is not None]


class ProcessKubelet:
    """Runs the pods of a control plane as local processes. See the module docstring for the substitutions."""

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str],
        workdir: str | os.PathLike[str],
        *,
        node_name: str = NODE_NAME,
        namespaces: Iterable[str] | None = None,
        executables: Mapping[str, str] | None = None,
        default_entrypoint: Sequence[str] = ("kuberlhf",),
        base_env: Mapping[str, str] | None = None,
        extra_env: Mapping[str, str] | None = None,
        register_node: bool = True,
    ) -> None:
        self.api = KubeREST.from_kubeconfig(kubeconfig)
        self.workdir = Path(workdir)
        self.node_name = node_name
        self.namespaces = set(namespaces) if namespaces else None
        # The virtualenv's bin first, so `kuberlhf` is this checkout's CLI.
        self.search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.executables = dict(executables or {})
        self.default_entrypoint = list(default_entrypoint)
        env = dict(os.environ if base_env is None else base_env)
        for k in SCRUBBED_ENV:
            env.pop(k, None)
        env["PATH"] = self.search_path
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(extra_env or {})
        self.base_env = env
        self.register_node = register_node
        self.runs: dict[str, PodRun] = {}  # by pod uid
        self._lock = threading.RLock()
        self._indices: dict[str, dict[str, int]] = {}  # job uid -> pod uid -> completion index
        self._master_ports: dict[tuple[str, ...], int] = {}  # rendezvous scope -> its local port
        self._handed_ports: set[int] = set()
        self._stopped = threading.Event()
        self._watcher: threading.Thread | None = None
        self.errors: list[str] = []

    def _new_port(self) -> int:
        """A free local port this kubelet has not handed out before: a pod binds its port only after its imports
        (seconds to minutes), and until then ``bind(0)`` may return the same port again."""
        with self._lock:
            port = free_port()
            while port in self._handed_ports:
                port = free_port()
            self._handed_ports.add(port)
            return port

    # --- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> ProcessKubelet:
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        if self.register_node:
            self._register_node()
        self._watcher = threading.Thread(target=self._watch_loop, name="process-kubelet-watch", daemon=True)
        self._watcher.start()
        return self

    def stop(self) -> None:
        """Kill every process this kubelet started (pods keep their last status)."""
        self._stopped.set()
        with self._lock:
            runs = list(self.runs.values())
        for run in runs:
            self._signal_run(run, signal.SIGKILL)
        for run in runs:
            if run.thread is not None:
                run.thread.join(timeout=10)

    def __enter__(self) -> ProcessKubelet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what tests use ------------------------------------------------------------------------------
    def find(self, namespace: str, name: str) -> PodRun | None:
        with self._lock:
            matches = [r for r in self.runs.values() if r.namespace == namespace and r.name == name]
        return matches[-1] if matches else None

    def active(self, namespace: str | None = None, labels: Mapping[str, str] | None = None) -> list[PodRun]:
        """Pods whose processes are running now (optionally in a namespace / with these labels)."""
        with self._lock:
            runs = list(self.runs.values())
        return [
            r for r in runs
            if r.pids() and (namespace is None or r.namespace == namespace)
            and all(r.labels.get(k) == v for k, v in (labels or {}).items())
        ]

    def kill_pod(self, namespace: str, name: str, sig: int = signal.SIGKILL) -> bool:
        """Kill the pod's processes, as a crash or OOM would: the pod fails (restartPolicy Never)."""
        run = self.find(namespace, name)
        if run is None or not run.pids():
            return False
        self._signal_run(run, sig)
        return True

    def evict_pod(self, namespace: str, name: str, reason: str = "TerminationByKubelet") -> bool:
        """End the pod for the node's sake, as a kubelet's eviction or graceful node shutdown does on 1.26+: a
        DisruptionTarget condition on the pod, SIGTERM, SIGKILL after the grace period (capped at
        MAX_GRACE_SECONDS); the pod ends Failed (restartPolicy Never)."""
        run = self.find(namespace, name)
        if run is None or not run.pids():
            return False
        run.disruption = {"type": "DisruptionTarget", "status": "True", "reason": reason, "lastProbeTime": None,
                          "message": "the node is evicting the pod", "lastTransitionTime": now_rfc3339()}
        self._write_status(run)
        self._signal_run(run, signal.SIGTERM)
        period = run.pod["spec"].get("terminationGracePeriodSeconds")
        grace = min(float(30 if period is None else period), MAX_GRACE_SECONDS)
        threading.Timer(grace, self._signal_run, args=(run, signal.SIGKILL)).start()
        return True

    def log_path(self, namespace: str, name: str, container: str | None = None) -> Path:
        run = self.find(namespace, name)
        if run is None:
            raise KeyError(f"pod {namespace}/{name} was never run by this kubelet")
        c = next((c for c in run.containers if container in (None, c.name)), None)
        if c is None:
            raise KeyError(f"pod {namespace}/{name} has no container {container!r}")
        return c.log_path

    def logs(self, namespace: str, name: str, container: str | None = None) -> str:
        path = self.log_path(namespace, name, container)
        return path.read_text(errors="replace") if path.exists() else ""

    def local_port(self, namespace: str, name: str, container_port: int) -> int:
        run = self.find(namespace, name)
        if run is None:
            raise KeyError(f"pod {namespace}/{name} was never run by this kubelet")
        return run.ports.get(container_port, container_port)

    def service_url(self, namespace: str, service: str, port: int | None = None) -> str:
        """http://127.0.0.1:<local port> of a Ready pod behind a Service (what the Service would route to)."""
        svc = self.api.get(f"/api/v1/namespaces/{namespace}/services/{service}")
        selector = svc["spec"].get("selector") or {}
        sport = next(p for p in svc["spec"]["ports"] if port in (None, p["port"]))
        target = sport.get("targetPort", sport["port"])
        for run in self.active(namespace, selector):
            if not all(c.ready for c in run.containers):
                continue
            if isinstance(target, str):  # a named container port
                target = next(p["containerPort"] for c in run.containers for p in c.spec.get("ports") or []
                              if p.get("name") == target)
            return f"http://127.0.0.1:{run.ports.get(int(target), int(target))}"
        raise LookupError(f"no Ready pod behind service {namespace}/{service} (selector {selector})")

    # --- watch ---------------------------------------------------------------------------------------
    def _pods_path(self) -> str:
        if self.namespaces and len(self.namespaces) == 1:
            return f"/api/v1/namespaces/{next(iter(self.namespaces))}/pods"
        return "/api/v1/pods"

    def _watch_loop(self) -> None:
        rv: str | None = None
        while not self._stopped.is_set():
            try:
                if rv is None:
                    listing = self.api.get(self._pods_path())
                    rv = listing["metadata"]["resourceVersion"]
                    seen = set()
                    for pod in listing["items"]:
                        seen.add(pod["metadata"]["uid"])
                        self._on_pod(pod)
                    with self._lock:
                        vanished = [r for uid, r in self.runs.items() if uid not in seen]
                    for run in vanished:
                        self._on_gone(run)
                for event in self.api.watch(self._pods_path(), rv, timeout_seconds=20):
                    if self._stopped.is_set():
                        return
                    if event["type"] == "ERROR":  # e.g. 410 Gone: list again
                        rv = None
                        break
                    pod = event["object"]
                    rv = pod["metadata"]["resourceVersion"]
                    if event["type"] == "DELETED":
                        with self._lock:
                            run = self.runs.get(pod["metadata"]["uid"])
                        if run is not None:
                            self._on_gone(run)
                    else:
                        self._on_pod(pod)
            except Exception as e:  # the API server restarting, a dropped stream: list again
                if self._stopped.is_set():
                    return
                log.debug("watch error: %s", e)
                rv = None
                time.sleep(0.5)

    def _on_pod(self, pod: dict[str, Any]) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        node = spec.get("nodeName")
        if node and node != self.node_name:
            return
        if self.namespaces and meta["namespace"] not in self.namespaces:
            return
        with self._lock:
            run = self.runs.get(meta["uid"])
            if run is not None:
                run.pod = pod
        if meta.get("deletionTimestamp"):
            if run is not None and not run.done.is_set():
                run.delete_requested.set()  # the worker stops the processes, then confirms the deletion
            elif node == self.node_name:
                self._confirm_delete(meta["namespace"], meta["name"], meta["uid"])
            return
        if run is not None or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            return
        run = PodRun(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"], pod=pod,
                     workdir=self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}")
        with self._lock:
            self.runs[run.uid] = run
        run.thread = threading.Thread(target=self._run_pod_safely, args=(run,), name=f"pod-{run.name}", daemon=True)
        run.thread.start()

    def _on_gone(self, run: PodRun) -> None:
        run.gone.set()
        run.delete_requested.set()

    # --- one pod -------------------------------------------------------------------------------------
    def _run_pod_safely(self, run: PodRun) -> None:
        try:
            self._run_pod(run)
        except Exception as e:  # a harness bug must be visible, not a silently stuck pod
            log.exception("pod %s/%s", run.namespace, run.name)
            self.errors.append(f"{run.namespace}/{run.name}: {type(e).__name__}: {e}")
            self._signal_run(run, signal.SIGKILL)
        finally:
            run.done.set()
            self._release_index(run)

    def _run_pod(self, run: PodRun) -> None:
        pod = run.pod
        spec = pod["spec"]
        if not spec.get("nodeName"):
            while (why := self._unschedulable(run)) is not None:
                self._write_status(run, {"phase": "Pending", "conditions": [{
                    "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why,
                    "lastProbeTime": None, "lastTransitionTime": now_rfc3339()}]})
                if run.delete_requested.wait(1.0):
                    self._finish_deleted(run)
                    return
            self._bind(run)
        run.workdir.mkdir(parents=True, exist_ok=True)
        self._assign_index(run)
        restart_policy = spec.get("restartPolicy", "Always")
        init_specs = spec.get("initContainers") or []
        main_specs = spec.get("containers") or []
        for c in init_specs + main_specs:
            for p in c.get("ports") or []:
                run.ports.setdefault(int(p["containerPort"]), self._new_port())
        if run.ports:
            self._patch_meta(run, {PORTS_ANNOTATION: json.dumps({str(k): v for k, v in run.ports.items()})})
        logs = self.workdir / "logs"
        inits = [ContainerRun(c["name"], c, logs / f"{run.namespace}_{run.name}_{c['name']}.log") for c in init_specs]
        run.containers = [ContainerRun(c["name"], c, logs / f"{run.namespace}_{run.name}_{c['name']}.log")
                          for c in main_specs]
        run.start_time = now_rfc3339()
        # Env needs Secrets/ConfigMaps that may appear later: wait like a kubelet (CreateContainerConfigError).
        while not self._prepare(run, inits + run.containers):
            self._write_status(run)
            if run.delete_requested.wait(1.0):
                self._finish_deleted(run)
                return
        for init in inits:
            self._start(run, init)
            while init.running and not run.delete_requested.wait(0.2):
                pass
            if run.delete_requested.is_set():
                self._finish_deleted(run)
                return
            self._reap(init)
            if init.exit_code != 0:
                run.containers = [init]
                run.phase = "Failed"
                self._write_status(run)
                return
        for c in run.containers:
            self._start(run, c)
        run.phase = "Running"
        last_status: Any = None
        while True:
            if run.delete_requested.is_set():
                self._finish_deleted(run)
                return
            if self._stopped.is_set():  # the kubelet stops: its processes die, nothing restarts them
                self._signal_run(run, signal.SIGKILL)
                return
            for c in run.containers:
                if c.proc is not None and not c.running and c.exit_code is None:
                    self._reap(c)
                    if restart_policy == "Always" or (restart_policy == "OnFailure" and c.exit_code != 0):
                        c.next_restart = time.monotonic() + min(10.0, 2.0 ** c.restart_count)
                        c.waiting_reason, c.waiting_message = "CrashLoopBackOff", f"exit code {c.exit_code}"
                if c.waiting_reason == "CrashLoopBackOff" and time.monotonic() >= c.next_restart:
                    c.restart_count += 1
                    self._start(run, c)
            self._probe(run)
            finished = [c for c in run.containers if c.exit_code is not None and c.waiting_reason is None]
            if len(finished) == len(run.containers):
                run.phase = "Succeeded" if all(c.exit_code == 0 for c in finished) else "Failed"
                self._write_status(run)
                return
            status = self._status(run)
            if status != last_status:
                self._write_status(run, status)
                last_status = status
            run.delete_requested.wait(0.3)

    def _prepare(self, run: PodRun, containers: list[ContainerRun]) -> bool:
        ns = run.namespace
        try:
            sa_kubeconfig = self._service_account_kubeconfig(run)
            services = {(s["metadata"]["namespace"], s["metadata"]["name"]) for s in self.api.get("/api/v1/services")["items"]}
            for c in containers:
                env = podspec.resolve_env(run.pod, c.spec, self._secret_key, self._cm_key, self._secret_data, self._cm_data)
                c.argv = podspec.container_argv(c.spec, env, self.default_entrypoint)
                if run.completion_index is not None:
                    env.setdefault(podspec.JOB_COMPLETION_INDEX_ENV, str(run.completion_index))
                c.argv = [podspec.rewrite_cluster_hosts(a, ns, services) for a in c.argv]
                c.argv, ported = podspec.rewrite_ports(c.argv, env, run.ports)
                env = self._rewrite_network(run, env, ported, services)
                if sa_kubeconfig is not None:
                    env.setdefault("KUBECONFIG", str(sa_kubeconfig))
                c.env = env
                c.waiting_reason, c.waiting_message = "ContainerCreating", ""
        except podspec.EnvResolutionError as e:
            for c in containers:
                c.waiting_reason, c.waiting_message = "CreateContainerConfigError", str(e)
            return False
        return True

    def _service_account_kubeconfig(self, run: PodRun) -> Path | None:
        spec = run.pod["spec"]
        sa_name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        try:
            sa = self.api.get(f"/api/v1/namespaces/{run.namespace}/serviceaccounts/{sa_name}")
        except ApiError as e:
            if e.status == 404:
                raise podspec.EnvResolutionError(f"service account {run.namespace}/{sa_name} not found") from None
            raise
        automount = spec.get("automountServiceAccountToken", sa.get("automountServiceAccountToken", True))
        if automount is False:
            return None
        for ref in sa.get("secrets") or []:
            data = self._secret_data(run.namespace, ref["name"])
            if data and data.get("token"):
                break
        else:
            raise podspec.EnvResolutionError(f"service account {run.namespace}/{sa_name} has no token yet")
        server = self.api.server
        cfg = {"apiVersion": "v1", "kind": "Config",
               "clusters": [{"name": "in-cluster", "cluster": {"server": server, "certificate-authority-data": base64.b64encode(data.get("ca.crt", "").encode() or self.api.ca_pem).decode()}}],
               "users": [{"name": sa_name, "user": {"token": data["token"]}}],
               "contexts": [{"name": "in-cluster", "context": {"cluster": "in-cluster", "user": sa_name, "namespace": run.namespace}}],
               "current-context": "in-cluster"}
        path = run.workdir / "serviceaccount.kubeconfig"
        path.write_text(json.dumps(cfg))
        path.chmod(0o600)
        return path

    def _rewrite_network(self, run: PodRun, original: dict[str, str], env: dict[str, str],
                         services: set[tuple[str, str]]) -> dict[str, str]:
        out = {k: podspec.rewrite_cluster_hosts(v, run.namespace, services) for k, v in env.items()}
        addr, port = original.get("MASTER_ADDR"), original.get("MASTER_PORT")
        if addr and port:
            # One free port per rendezvous (podspec.rendezvous_scope): shared by the Job's pods that meet at
            # <job>-0.<svc>, never the per-pod containerPort map there, on which they would disagree.
            key = podspec.rendezvous_scope(run.namespace, run.uid, addr, port)
            with self._lock:
                if key not in self._master_ports:
                    self._master_ports[key] = self._new_port()
                out["MASTER_PORT"] = str(self._master_ports[key])
        return out

    def _start(self, run: PodRun, c: ContainerRun) -> None:
        env = {**self.base_env, "HOSTNAME": run.name,
               "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": self.api.server.rsplit(":", 1)[1],
               "KUBERLHF_TERMINATION_LOG": str(c.termination_log), **c.env}
        c.termination_log.unlink(missing_ok=True)
        argv = list(c.argv)
        if self._stopped.is_set():
            return
        exe = self.executables.get(argv[0]) if argv else None
        exe = exe or (shutil.which(argv[0], path=env.get("PATH", self.search_path)) if argv else None)
        c.started_at = now_rfc3339()
        c.exit_code, c.finished_at, c.ready, c.waiting_reason = None, None, False, None
        with open(c.log_path, "ab") as logf:
            if exe is None:
                logf.write(f"process-kubelet: executable {argv[:1]} not found on PATH\n".encode())
                c.proc = None
                c.exit_code, c.finished_at = 127, now_rfc3339()
                c.message = f"executable {argv[:1]} not found"
                return
            c.proc = subprocess.Popen([exe, *argv[1:]], env=env, cwd=run.workdir, stdout=logf, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        log.info("started %s/%s[%s] pid %s: %s", run.namespace, run.name, c.name, c.proc.pid, argv)

    def _reap(self, c: ContainerRun) -> None:
        assert c.proc is not None
        rc = c.proc.wait()
        c.exit_code = 128 - rc if rc < 0 else rc  # killed by signal N -> 128+N, as a container runtime reports
        c.finished_at = now_rfc3339()
        c.ready = False
        c.waiting_reason = None
        text = c.log_path.read_text(errors="replace") if c.log_path.exists() else ""
        report = c.termination_log
        written = report.read_text(errors="replace")[:4096] if report.exists() else ""
        c.message = written or (podspec.termination_message(text) if c.exit_code != 0 else "")

    def _probe(self, run: PodRun) -> None:
        for c in run.containers:
            if not c.running:
                c.ready = False
                continue
            probe = c.spec.get("readinessProbe")
            if not probe:
                c.ready = True
                continue
            c.ready = self._probe_once(run, c, probe)

    def _probe_once(self, run: PodRun, c: ContainerRun, probe: dict[str, Any]) -> bool:
        def local(port: Any) -> int:
            if isinstance(port, str) and not port.isdigit():
                port = next(p["containerPort"] for p in c.spec.get("ports") or [] if p.get("name") == port)
            return run.ports.get(int(port), int(port))

        try:
            if "httpGet" in probe:
                hg = probe["httpGet"]
                url = f"http://127.0.0.1:{local(hg['port'])}{hg.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=1) as resp:
                    return 200 <= resp.status < 400
            if "tcpSocket" in probe:
                with socket.create_connection(("127.0.0.1", local(probe["tcpSocket"]["port"])), timeout=1):
                    return True
            if "exec" in probe:
                env = {**self.base_env, **c.env}
                return subprocess.run(probe["exec"]["command"], env=env, cwd=run.workdir, capture_output=True,
                                      timeout=5).returncode == 0
        except (OSError, urllib.error.URLError, subprocess.TimeoutExpired, StopIteration, ValueError):
            return False
        return True

    def _finish_deleted(self, run: PodRun) -> None:
        period = run.pod["spec"].get("terminationGracePeriodSeconds")
        grace = min(float(30 if period is None else period), MAX_GRACE_SECONDS)
        self._signal_run(run, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.running for c in run.containers) and time.monotonic() < deadline:
            time.sleep(0.1)
        self._signal_run(run, signal.SIGKILL)
        for c in run.containers:
            if c.proc is not None:
                c.proc.wait()
        if not run.gone.is_set():
            self._confirm_delete(run.namespace, run.name, run.uid)

    def _signal_run(self, run: PodRun, sig: int) -> None:
        for c in run.containers:
            if c.running and c.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(c.proc.pid, sig)  # the whole process group: DeepSpeed ranks, uvicorn workers

    # --- API writes ----------------------------------------------------------------------------------
    def _status(self, run: PodRun) -> dict[str, Any]:
        images = {c["name"]: c.get("image", "") for c in run.pod["spec"].get("containers") or []}
        images.update({c["name"]: c.get("image", "") for c in run.pod["spec"].get("initContainers") or []})
        statuses = [c.status(images.get(c.name, "")) for c in run.containers]
        started = run.phase != "Pending"
        all_ready = run.phase == "Running" and all(s["ready"] for s in statuses)
        reason = {"reason": "PodCompleted"} if run.phase in ("Succeeded", "Failed") else {}

        def cond(kind: str, ok: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None,
                    "lastTransitionTime": run.start_time, **(extra or {})}

        return {
            "phase": run.phase,
            "hostIP": podspec.LOOPBACK,
            "podIP": podspec.LOOPBACK,
            "podIPs": [{"ip": podspec.LOOPBACK}],
            "startTime": run.start_time,
            "conditions": [
                cond("PodScheduled", True),
                cond("Initialized", started),
                cond("ContainersReady", all_ready, None if all_ready else reason),
                cond("Ready", all_ready, None if all_ready else reason),
                *([run.disruption] if run.disruption else []),
            ],
            "containerStatuses": statuses,
        }

    def _write_status(self, run: PodRun, status: dict[str, Any] | None = None) -> None:
        status = status or self._status(run)
        try:
            self.api.merge_patch(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status", {"status": status})
        except ApiError as e:
            if e.status != 404:
                raise

    def _patch_meta(self, run: PodRun, annotations: dict[str, str]) -> None:
        with contextlib.suppress(ApiError):
            self.api.merge_patch(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}",
                                 {"metadata": {"annotations": annotations}})

    def _bind(self, run: PodRun) -> None:
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": run.name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name}}
        try:
            self.api.post(f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/binding", body)
        except ApiError as e:
            if e.status != 409:  # 409: already bound (a previous kubelet of this node)
                raise

    def _unschedulable(self, run: PodRun) -> str | None:
        """The scheduler's message when the pod's nodeSelector does not match this node's labels, else None."""
        selector = run.pod["spec"].get("nodeSelector") or {}
        if not selector:
            return None
        labels = (self.api.get(f"/api/v1/nodes/{self.node_name}").get("metadata") or {}).get("labels") or {}
        if all(labels.get(k) == v for k, v in selector.items()):
            return None
        return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."

    def _confirm_delete(self, namespace: str, name: str, uid: str) -> None:
        # A bound pod's graceful deletion ends when its kubelet confirms with grace period 0.
        body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0, "preconditions": {"uid": uid}}
        with contextlib.suppress(ApiError):
            self.api.delete(f"/api/v1/namespaces/{namespace}/pods/{name}", body)

    def _register_node(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": self.node_name, "labels": {"kubernetes.io/hostname": self.node_name,
                                                                 "kubernetes.io/os": "linux"}}}
        try:
            self.api.post("/api/v1/nodes", node)
        except ApiError as e:
            if e.status != 409:
                raise
        cpus = str(os.cpu_count() or 1)
        status = {"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "process kubelet",
                            "lastHeartbeatTime": now_rfc3339(), "lastTransitionTime": now_rfc3339()}],
            "addresses": [{"type": "InternalIP", "address": podspec.LOOPBACK}, {"type": "Hostname", "address": self.node_name}],
            "capacity": {"cpu": cpus, "memory": "64Gi", "pods": "110"},
            "allocatable": {"cpu": cpus, "memory": "64Gi", "pods": "110"},
        }}
        with contextlib.suppress(ApiError):
            self.api.merge_patch(f"/api/v1/nodes/{self.node_name}/status", status)

    # --- secrets, config maps, job completion index --------------------------------------------------
    def _get_data(self, kind: str, ns: str, name: str) -> dict[str, str] | None:
        try:
            obj = self.api.get(f"/api/v1/namespaces/{ns}/{kind}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        if kind == "secrets":
            return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}
        return dict(obj.get("data") or {})

    def _secret_data(self, ns: str, name: str) -> dict[str, str] | None:
        return self._get_data("secrets", ns, name)

    def _cm_data(self, ns: str, name: str) -> dict[str, str] | None:
        return self._get_data("configmaps", ns, name)

    def _secret_key(self, ns: str, name: str, key: str) -> str | None:
        return (self._secret_data(ns, name) or {}).get(key)

    def _cm_key(self, ns: str, name: str, key: str) -> str | None:
        return (self._cm_data(ns, name) or {}).get(key)

    def _assign_index(self, run: PodRun) -> None:
        meta = run.pod["metadata"]
        ann = meta.get("annotations") or {}
        if podspec.JOB_COMPLETION_INDEX_ANNOTATION in ann:
            run.completion_index = int(ann[podspec.JOB_COMPLETION_INDEX_ANNOTATION])
            return
        owner = podspec.job_owner(run.pod)
        if owner is None:
            return
        with self._lock:
            held = self._indices.setdefault(owner["uid"], {})
            taken = set(held.values())
            siblings = self.api.get(f"/api/v1/namespaces/{run.namespace}/pods",
                                    labelSelector=f"controller-uid={owner['uid']}")["items"]
            for p in siblings:
                idx = (p["metadata"].get("annotations") or {}).get(podspec.JOB_COMPLETION_INDEX_ANNOTATION)
                if idx is not None and p["metadata"]["uid"] != run.uid and (p.get("status") or {}).get("phase") != "Failed":
                    taken.add(int(idx))
            run.completion_index = podspec.next_completion_index(taken)
            run.job_uid = owner["uid"]
            held[run.uid] = run.completion_index
        self._patch_meta(run, {podspec.JOB_COMPLETION_INDEX_ANNOTATION: str(run.completion_index)})
        run.pod["metadata"].setdefault("annotations", {})[podspec.JOB_COMPLETION_INDEX_ANNOTATION] = str(run.completion_index)

    def _release_index(self, run: PodRun) -> None:
        # A failed pod's index is free again: its replacement takes the same rank.
        if run.job_uid is not None and run.phase != "Succeeded":
            with self._lock:
                self._indices.get(run.job_uid, {}).pop(run.uid, None)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the pods of a control plane as local processes.")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--namespace", action="append", help="only these namespaces (default: all)")
    parser.add_argument("--node-name", default=NODE_NAME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    kubelet = ProcessKubelet(args.kubeconfig, args.workdir, node_name=args.node_name, namespaces=args.namespace)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with kubelet:
        stop.wait()


if __name__ == "__main__":
    main()
