"""The Kubernetes Pod Security Standards, baseline + restricted profiles (policy version "latest", as of 1.30:
https://kubernetes.io/docs/concepts/security/pod-security-standards/), as a pure check of a PodSpec.

A stand-in: the real check is the API server's PodSecurity admission (1.23+), and the e2e tier's apiserver is
1.20, which has none. Every rule below is one row of the standard's tables, named as there."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

BASELINE_CAPABILITIES = frozenset(
    {
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    }
)
SAFE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)
RESTRICTED_VOLUMES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})


def _containers(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(field) or []:
            yield f"{field}[{c.get('name', '?')}]", c


def violations(spec: dict[str, Any]) -> list[str]:
    """Every rule of the restricted profile (which includes baseline) that ``spec`` (a PodSpec) breaks."""
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    # --- baseline ---
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            out.append(f"Host Namespaces: spec.{key} must be unset or false")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("HostProcess: spec.securityContext.windowsOptions.hostProcess must not be true")
    for v in spec.get("volumes") or []:
        if "hostPath" in v:
            out.append(f"HostPath Volumes: volume {v.get('name')} is a hostPath")
        kinds = [k for k in v if k != "name"]
        if kinds and kinds[0] not in RESTRICTED_VOLUMES:
            out.append(f"Volume Types: volume {v.get('name')} is a {kinds[0]}")
    for sysctl in psc.get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            out.append(f"Sysctls: {sysctl.get('name')} is not in the safe set")

    def se_linux(where: str, ctx: dict[str, Any]) -> None:
        opts = ctx.get("seLinuxOptions") or {}
        if opts.get("type", "") not in SELINUX_TYPES or opts.get("user") or opts.get("role"):
            out.append(f"SELinux: {where}.seLinuxOptions {opts}")

    def seccomp_type(ctx: dict[str, Any]) -> str | None:
        return (ctx.get("seccompProfile") or {}).get("type")

    se_linux("spec.securityContext", psc)
    pod_seccomp = seccomp_type(psc)
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"Seccomp: spec.securityContext.seccompProfile.type is {pod_seccomp}")
    if psc.get("runAsUser") == 0:
        out.append("Running as Non-root user: spec.securityContext.runAsUser is 0")
    for where, c in _containers(spec):
        sc = c.get("securityContext") or {}
        caps = sc.get("capabilities") or {}
        if sc.get("privileged"):
            out.append(f"Privileged Containers: {where} is privileged")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"HostProcess: {where}")
        for port in c.get("ports") or []:
            if port.get("hostPort"):
                out.append(f"Host Ports: {where} uses hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"/proc Mount Type: {where} procMount {sc['procMount']}")
        if (sc.get("appArmorProfile") or {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"AppArmor: {where}")
        se_linux(where, sc)
        # --- restricted ---
        added = set(caps.get("add") or [])
        if added - BASELINE_CAPABILITIES:
            out.append(f"Capabilities (baseline): {where} adds {sorted(added - BASELINE_CAPABILITIES)}")
        if added - {"NET_BIND_SERVICE"}:
            out.append(f"Capabilities: {where} adds {sorted(added - {'NET_BIND_SERVICE'})}")
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"Capabilities: {where} must drop ALL")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"Privilege Escalation: {where} must set allowPrivilegeEscalation: false")
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"Running as Non-root: {where} (or the pod) must set runAsNonRoot: true")
        if sc.get("runAsUser") == 0:
            out.append(f"Running as Non-root user: {where} runAsUser is 0")
        c_seccomp = seccomp_type(sc) or pod_seccomp
        if c_seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"Seccomp: {where} (or the pod) must set seccompProfile RuntimeDefault or Localhost")
    return out


def pod_templates(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind/name, PodSpec) of every object that holds pods."""
    for o in objects:
        kind, name = o.get("kind"), (o.get("metadata") or {}).get("name")
        if kind == "Pod":
            yield f"Pod/{name}", o.get("spec") or {}
        elif kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
            yield f"{kind}/{name}", o["spec"]["template"].get("spec") or {}
        elif kind == "CronJob":
            yield f"CronJob/{name}", o["spec"]["jobTemplate"]["spec"]["template"].get("spec") or {}
