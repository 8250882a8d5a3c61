"""Seeds and connection bounds of a real `kuberlhf serve` with four generations at once: seeded answers are the
same whatever runs beside them, and idle, trickling or half-sent connections are closed on time while a cap
bounds how many may be open (uvicorn answers 503 beyond it)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import socket
import time

import httpx
import openai
import pytest

from serving.servers import ServerProcess

HELLO = [{"role": "user", "content": "Tell me about the sea."}]


def _ask(server: ServerProcess, seed: int | None) -> str:
    client = openai.OpenAI(base_url=server.api, api_key="none", max_retries=0, timeout=120)
    kwargs = {} if seed is None else {"seed": seed}
    done = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=16, temperature=1.0, stop=["\x00"], **kwargs
    )
    return done.choices[0].message.content


def test_seeded_answers_are_reproducible_at_concurrency_4(open_server: ServerProcess) -> None:
    alone = {seed: _ask(open_server, seed) for seed in (7, 8)}
    assert alone[7] != alone[8]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        seeded = [pool.submit(_ask, open_server, seed) for seed in (7, 8, 7, 8)]
        unseeded = [pool.submit(_ask, open_server, None) for _ in range(4)]
        got = [f.result(timeout=300) for f in seeded]
        free = [f.result(timeout=300) for f in unseeded]
    assert got == [alone[7], alone[8], alone[7], alone[8]]
    # the seeded requests did not reseed their neighbours: unseeded answers still differ from each other
    assert len(set(free)) > 1 and not set(free) & set(alone.values())


def _connect(server: ServerProcess) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closed ``sock`` (fails if it stays open longer than ``seconds``)."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError as exc:
        raise AssertionError(f"the connection is still open after {seconds} s") from exc
    except ConnectionResetError:
        pass
    return time.monotonic() - t0


def test_idle_trickling_and_half_sent_connections_are_closed(open_server: ServerProcess) -> None:
    """Server: --header-timeout 1.5 --body-timeout 1.5 --keep-alive-timeout 1."""
    idle = _connect(open_server)
    assert _closed_within(idle, 5) < 3
    trickle = _connect(open_server)
    t0 = time.monotonic()
    trickle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
    for _ in range(20):  # a byte every 0.2 s keeps the connection busy but never finishes the headers
        try:
            trickle.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.2)
    assert time.monotonic() - t0 < 3.5
    half = _connect(open_server)
    half.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"model"')
    assert _closed_within(half, 5) < 3
    keep = _connect(open_server)
    keep.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in keep.recv(4096)
    assert _closed_within(keep, 5) < 2.5
    for s in (idle, trickle, half, keep):
        s.close()


def test_connections_beyond_the_cap_get_503(open_server: ServerProcess) -> None:
    """Server: --limit-connections 12. Eleven open connections plus this request's own make twelve."""
    held = [_connect(open_server) for _ in range(11)]
    try:
        resp = httpx.get(open_server.url + "/healthz", timeout=10)
        assert resp.status_code == 503
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while httpx.get(open_server.url + "/healthz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the cap did not lift after the connections closed"
        time.sleep(0.1)


def _other_addresses() -> list[str]:
    """This machine's IPv4 addresses other than loopback (the source address of a route; no packet is sent)."""
    found = set()
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.123", 9))  # TEST-NET-1: any routable address would do
        found.add(s.getsockname()[0])
    with contextlib.suppress(OSError):
        found |= {a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)}
    return sorted(a for a in found if not a.startswith("127."))


def test_serve_listens_on_loopback_only_unless_told_otherwise(open_server: ServerProcess) -> None:
    """`kuberlhf serve` started without --host (as every server of this tier) answers on 127.0.0.1 and refuses a
    connection to this machine's other addresses; the chat Deployment passes --host 0.0.0.0
    (tests/operator/test_operator_manifests.py)."""
    port = int(open_server.url.rsplit(":", 1)[1])
    assert httpx.get(open_server.url + "/healthz", timeout=5).status_code == 200
    others = _other_addresses()
    assert others, "this machine has no non-loopback IPv4 address to check against"
    for address in others:
        with pytest.raises(ConnectionRefusedError), socket.create_connection((address, port), timeout=5):
            pass
