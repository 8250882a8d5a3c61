"""Helpers of the serving tests: start a real `kuberlhf serve` process on a free loopback port."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

READY_TIMEOUT_S = 180  # importing torch on a busy 2-core CI machine is the slow part


def kuberlhf_bin() -> str:
    """The `kuberlhf` console script of this environment."""
    candidate = Path(sys.executable).parent / "kuberlhf"
    return str(candidate) if candidate.exists() else (shutil.which("kuberlhf") or "kuberlhf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log_path: Path
    api_key: str | None = None

    @property
    def api(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_server(model: str | Path, log_dir: Path, *extra: str, env: dict[str, str] | None = None) -> ServerProcess:
    """`kuberlhf serve` in a subprocess; returns once /readyz answers 200 (fails with the server log if not)."""
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    # no --host: the default (loopback) is what these servers listen on, and test_server_bounds checks it
    cmd = [kuberlhf_bin(), "serve", "--model", str(model), "--port", str(port), *extra]
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, full_env.get("KUBERLHF_API_KEY"))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kuberlhf serve exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    pytest.fail(f"kuberlhf serve not ready after {READY_TIMEOUT_S} s:\n{server.log()}")


# The shared server: one generation at a time and one waiting, so the concurrency bound is observable; a small
# body limit so it is cheap to hit; a token cap below the 512-token context; an API key (one server start less
# than testing the key on a server of its own: each start imports torch, ~30 s on a busy CI machine).
SHARED_FLAGS = ("--max-concurrency", "1", "--max-queue", "1", "--max-request-bytes", "65536", "--max-new-tokens", "400")
SHARED_API_KEY = "test-key-0123"
