"""The per-node process launcher: logs, failure stops the other nodes, log tails."""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import psutil

from kuberlhf.runner.launch import free_port, resolve_command, run_nodes, tail_text


def test_tail_resolves_progress_bars() -> None:
    data = b"start\nstep 1/3\rstep 2/3\rstep 3/3\nboom\n\n"
    assert tail_text(data, 2) == "step 3/3\nboom"


def test_resolve_command_finds_the_venv_entrypoint() -> None:
    argv = resolve_command(["kuberlhf", "stage", "sft"])
    assert argv[-2:] == ["stage", "sft"]
    assert Path(argv[0]).name in ("kuberlhf", Path(sys.executable).name)


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_nodes_get_their_env_and_logs(tmp_path: Path) -> None:
    code = "import os; print('node', os.environ['NODE_RANK'], 'of', os.environ['NNODES'])"
    envs = [{**os.environ, "NODE_RANK": str(r), "NNODES": "2"} for r in range(2)]
    echo = io.BytesIO()
    res = run_nodes([sys.executable, "-c", code], envs, tmp_path, "sft", echo=echo)
    assert res.ok and res.returncodes == [0, 0]
    assert (tmp_path / "sft-node1.log").read_text().strip() == "node 1 of 2"
    assert echo.getvalue().strip() == b"node 0 of 2"  # only node 0 on the terminal


def test_a_failing_node_stops_the_others_and_their_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    # node 0 starts a child (like a stage spawning its ranks) and sleeps; node 1 fails after a moment
    code = (
        "import os, subprocess, sys, time\n"
        "if os.environ['NODE_RANK'] == '0':\n"
        f"    c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"    open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
        "    time.sleep(120)\n"
        "else:\n"
        "    time.sleep(1.5); print('rank failure', flush=True); sys.exit(3)\n"
    )
    envs = [{**os.environ, "NODE_RANK": str(r)} for r in range(2)]
    t0 = time.monotonic()
    res = run_nodes([sys.executable, "-c", code], envs, tmp_path, "ppo")
    assert time.monotonic() - t0 < 30
    assert not res.ok and res.failed_rank == 1 and res.returncodes[1] == 3
    assert "rank failure" in tail_text((tmp_path / "ppo-node1.log").read_bytes())
    child = int(pidfile.read_text())
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
