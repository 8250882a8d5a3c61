"""Start one stage as local processes, one per "node", exactly as the operator's Indexed Job starts pods:
the contract's command and env (``kuberlhf.contract.stage``), NODE_RANK = node index, MASTER_ADDR = loopback.
The stage entrypoint itself spawns NPROC_PER_NODE ranks.

All processes stay in the runner's process group, so Ctrl-C or killing the group stops the whole run the way
a deleted pod stops its containers; on a node failure the runner ends the other nodes' process trees itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO


def free_port() -> int:
    """A TCP port free on loopback right now (the rendezvous port of one stage attempt)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def resolve_command(command: Sequence[str]) -> list[str]:
    """The contract's command with its program found: on PATH, else next to this Python (a venv that is not
    activated), else ``python -m kuberlhf.cli`` for the ``kuberlhf`` entrypoint."""
    program, *args = command
    if shutil.which(program):
        return [program, *args]
    sibling = Path(sys.executable).parent / program
    if sibling.exists():
        return [str(sibling), *args]
    if program == "kuberlhf":
        return [sys.executable, "-m", "kuberlhf.cli", *args]
    raise FileNotFoundError(f"{program!r} is not on PATH: install kuberlhf (bash hack/setup.sh)")


def tail_text(data: bytes, lines: int = 40) -> str:
    """The last ``lines`` lines of a log, with progress-bar carriage returns resolved to their final state."""
    text = data.decode("utf-8", errors="replace")
    out = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out[-lines:])


@dataclass
class NodeProcess:
    rank: int
    proc: subprocess.Popen
    log_path: Path
    pump: threading.Thread | None = None


@dataclass
class StageResult:
    returncodes: list[int]
    elapsed_s: float
    log_paths: list[Path] = field(default_factory=list)
    first_failed: int | None = None  # the node that failed first (the others were stopped because of it)

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    @property
    def failed_rank(self) -> int | None:
        if self.first_failed is not None:
            return self.first_failed
        return next((rank for rank, rc in enumerate(self.returncodes) if rc != 0), None)


def _pump(src: BinaryIO, log: BinaryIO, echo: BinaryIO | None) -> None:
    # raw chunks, not lines: tqdm redraws with '\r', which a line reader would hold back until the bar ends
    fd = src.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        log.write(chunk)
        log.flush()
        if echo is not None:
            try:
                echo.write(chunk)
                echo.flush()
            except (OSError, ValueError):
                echo = None  # terminal went away: keep logging
    log.close()


def kill_tree(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """Terminate a node process and every process it started (its ranks), then kill what is left."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        procs = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=grace_s)


def run_nodes(
    command: Sequence[str],
    node_envs: Sequence[Mapping[str, str]],
    log_dir: Path,
    log_prefix: str,
    echo: BinaryIO | None = None,
    cwd: str | None = None,
    poll_s: float = 0.2,
) -> StageResult:
    """Run one process per node env; node 0's output goes to ``echo`` (the terminal), every node's to
    ``<log_dir>/<log_prefix>-node<i>.log``. The first failing node stops the others."""
    log_dir.mkdir(parents=True, exist_ok=True)
    argv = resolve_command(command)
    start = time.monotonic()
    nodes: list[NodeProcess] = []
    first_failed: int | None = None
    try:
        for rank, env in enumerate(node_envs):
            log_path = log_dir / f"{log_prefix}-node{rank}.log"
            proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, cwd=cwd)
            node = NodeProcess(rank, proc, log_path)
            log_file = open(log_path, "wb")  # noqa: SIM115 - the pump thread owns and closes it
            node.pump = threading.Thread(target=_pump, args=(proc.stdout, log_file,
                                                         echo if rank == 0 else None), daemon=True)
            node.pump.start()
            nodes.append(node)
        while True:
            codes = [n.proc.poll() for n in nodes]
            failed = [rank for rank, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                first_failed = failed[0]
                break
            if all(c is not None for c in codes):
                break
            time.sleep(poll_s)
    finally:
        # on failure, Ctrl-C or any error: no node may outlive the stage
        for n in nodes:
            if n.proc.poll() is None:
                kill_tree(n.proc)
        for n in nodes:
            n.proc.wait()
            if n.pump is not None:
                n.pump.join(timeout=10)
    return StageResult([n.proc.returncode for n in nodes], time.monotonic() - start, [n.log_path for n in nodes],
                       first_failed)
