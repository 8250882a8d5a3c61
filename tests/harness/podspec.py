"""Pure functions of the process kubelet: how a Pod's container becomes a local command line and environment.

Kept free of I/O (Secrets and ConfigMaps come in through lookup callables) so each rule is unit-tested on its own.
The pod is the plain JSON dict the API server returns (camelCase keys).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

JOB_COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_COMPLETION_INDEX_ENV = "JOB_COMPLETION_INDEX"
LOOPBACK = "127.0.0.1"

# (namespace, name, key) -> value or None when the object or key is missing
KeyLookup = Callable[[str, str, str], "str | None"]
# (namespace, name) -> whole data dict or None
DataLookup = Callable[[str, str], "dict[str, str] | None"]


class EnvResolutionError(ValueError):
    """A non-optional secretKeyRef/configMapKeyRef/fieldRef could not be resolved (Kubernetes:
    CreateContainerConfigError; the pod waits until the object appears)."""


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known names are replaced, unknown ones stay verbatim, `$$` is a literal `$`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return _VAR_REF.sub(sub, text)


_FIELD_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['([^']*)'\]$")


def resolve_field_ref(pod: Mapping[str, Any], field_path: str) -> str:
    """The downward API fields a pod can read. Status IPs are the loopback address: every pod runs here."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    m = _FIELD_SUBSCRIPT.match(field_path)
    if m:
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.hostIP": LOOPBACK,
        "status.podIP": LOOPBACK,
        "status.podIPs": LOOPBACK,
    }
    if field_path not in simple:
        raise EnvResolutionError(f"fieldRef.fieldPath {field_path!r} is not supported by the process kubelet")
    return str(simple[field_path])


def resolve_resource_field_ref(container: Mapping[str, Any], ref: Mapping[str, Any]) -> str:
    """limits.cpu / requests.memory etc. from the container's resources (the node's size when unset: 1 / 0)."""
    kind, _, res = ref.get("resource", "").partition(".")
    value = ((container.get("resources") or {}).get(kind) or {}).get(res)
    if value is None:
        return "1" if res == "cpu" else "0"
    return str(value)


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    secret_key: KeyLookup,
    config_map_key: KeyLookup,
    secret_data: DataLookup,
    config_map_data: DataLookup,
) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom first, then env in order (later wins),
    each `value` expanded against what is defined before it."""
    ns = (pod.get("metadata") or {}).get("namespace", "default")
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        prefix = src.get("prefix", "")
        for kind, lookup in (("secretRef", secret_data), ("configMapRef", config_map_data)):
            ref = src.get(kind)
            if ref is None:
                continue
            data = lookup(ns, ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise EnvResolutionError(f"envFrom.{kind}: {kind[:-3]} {ns}/{ref['name']} not found")
            env.update({prefix + k: v for k, v in data.items()})
    for item in container.get("env") or []:
        name = item["name"]
        if "valueFrom" not in item:
            env[name] = expand_vars(item.get("value", ""), env)
            continue
        vf = item["valueFrom"]
        if "secretKeyRef" in vf or "configMapKeyRef" in vf:
            kind = "secretKeyRef" if "secretKeyRef" in vf else "configMapKeyRef"
            ref = vf[kind]
            lookup = secret_key if kind == "secretKeyRef" else config_map_key
            value = lookup(ns, ref["name"], ref["key"])
            if value is None:
                if ref.get("optional"):
                    continue
                what = "secret" if kind == "secretKeyRef" else "configmap"
                raise EnvResolutionError(f"env {name}: {what} {ns}/{ref['name']} has no key {ref['key']!r}")
            env[name] = value
        elif "fieldRef" in vf:
            env[name] = resolve_field_ref(pod, vf["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in vf:
            env[name] = resolve_resource_field_ref(container, vf["resourceFieldRef"])
        else:
            raise EnvResolutionError(f"env {name}: unsupported valueFrom {sorted(vf)}")
    return env


def container_argv(container: Mapping[str, Any], env: Mapping[str, str], default_entrypoint: Sequence[str]) -> list[str]:
    """command + args with `$(VAR)` expansion; no command means the image's entrypoint (which the caller names)."""
    command = list(container.get("command") or default_entrypoint)
    return [expand_vars(a, env) for a in command + list(container.get("args") or [])]


_HOST_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_HOST = re.compile(rf"(?<![\w.@/-])({_HOST_LABEL}(?:\.{_HOST_LABEL})*)(?![\w.-])")
_URL_HOST = re.compile(rf"(?<=://)({_HOST_LABEL}(?:\.{_HOST_LABEL})*)(?=[:/]|$)")


def is_cluster_host(host: str, namespace: str, services: set[tuple[str, str]], bare_ok: bool = False) -> bool:
    """True for names cluster DNS would resolve: `*.svc[.cluster.local]`, `<pod>.<svc>[.<ns>]`, `<svc>.<ns>`,
    and (bare_ok, e.g. a URL host) a bare service name of the pod's namespace."""
    host = host.lower()
    if host.endswith(".svc") or host.endswith(".svc.cluster.local"):
        return True
    labels = host.split(".")
    if len(labels) == 1:
        return bare_ok and (namespace, host) in services
    if len(labels) == 2:  # <pod>.<svc> (a headless service's pod) or <svc>.<ns>
        return (namespace, labels[1]) in services or (labels[1], labels[0]) in services
    if len(labels) == 3:  # <pod>.<svc>.<ns>
        return (labels[2], labels[1]) in services
    return False


def rewrite_cluster_hosts(value: str, namespace: str, services: set[tuple[str, str]]) -> str:
    """Cluster DNS names -> 127.0.0.1 (every pod runs on this machine). JSON documents are left alone: they are
    data (e.g. the pipeline manifest), not addresses."""
    if value.lstrip().startswith(("{", "[")):
        return value
    value = _URL_HOST.sub(lambda m: LOOPBACK if is_cluster_host(m.group(1), namespace, services, True) else m.group(1), value)
    return _HOST.sub(lambda m: LOOPBACK if is_cluster_host(m.group(1), namespace, services) else m.group(1), value)


def rewrite_ports(argv: Sequence[str], env: Mapping[str, str], ports: Mapping[int, int]) -> tuple[list[str], dict[str, str]]:
    """Container port -> the free local port standing in for it, in `--port N` / `--port=N` arguments and in
    env vars named *PORT whose value is N. (Pods share this machine's network namespace.)"""
    out: list[str] = []
    prev = ""
    for arg in argv:
        if prev in ("--port", "-p") and arg.isdigit() and int(arg) in ports:
            arg = str(ports[int(arg)])
        elif arg.startswith("--port=") and arg[7:].isdigit() and int(arg[7:]) in ports:
            arg = f"--port={ports[int(arg[7:])]}"
        out.append(arg)
        prev = arg
    new_env = {
        k: (str(ports[int(v)]) if k.upper().endswith("PORT") and v.isdigit() and int(v) in ports else v)
        for k, v in env.items()
    }
    return out, new_env


def rendezvous_scope(namespace: str, pod_uid: str, master_addr: str, master_port: str) -> tuple[str, ...]:
    """Which pods share one rendezvous MASTER_PORT. A Service name (``<job>-0.<svc>``) is one address for every pod
    of the Job that writes it, so they share one port. A loopback MASTER_ADDR (the operator's single-node stages:
    every rank in one pod) is the pod's own network namespace on a cluster: the port is that pod's alone, and two
    single-node Jobs at once must not be handed the same one (they all write ``127.0.0.1:29500``)."""
    if master_addr in ("localhost", "::1") or master_addr.startswith("127."):
        return ("pod", pod_uid, master_port)
    return ("service", namespace, master_addr, master_port)


def next_completion_index(taken: set[int]) -> int:
    """The lowest index no live pod of the Job holds: a v1.20 Job has no completion index, so the harness gives
    each pod of a `completions = parallelism = N` Job a distinct rank in 0..N-1 (a replacement reuses the freed one)."""
    i = 0
    while i in taken:
        i += 1
    return i


def termination_message(log_text: str, max_lines: int = 80, max_bytes: int = 2048) -> str:
    """What `terminationMessagePolicy: FallbackToLogsOnError` reports: the log's tail (80 lines, 2 KiB)."""
    tail = "\n".join(log_text.rstrip("\n").splitlines()[-max_lines:])
    data = tail.encode()[-max_bytes:]
    return data.decode(errors="replace")


def job_owner(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (pod.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("controller"):
            return ref
    return None
