"""One real tiny run shared by the runner's end-to-end tests (session scope: the trainer's tests need the time
too). It is started, killed (the whole process group, SIGKILL) once PPO has committed a checkpoint, and run
again to completion, so the same outputs serve the resume assertions and the output assertions."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "tiny-cpu.yaml"


@dataclass
class TinyRun:
    out: Path
    first_log: str  # the killed run
    second_log: str  # the resumed run
    killed_at_step: int
    orphans: list[int]  # processes of the killed run still alive afterwards (must be none)
    wall_s: float  # both runs together
    second_rc: int


def kuberlhf() -> list[str]:
    exe = Path(sys.executable).parent / "kuberlhf"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "kuberlhf.cli"]


def _store_for(out: Path):
    from kuberlhf.storage import ObjectStore

    state = json.loads((out / "run.json").read_text())
    creds = json.loads(Path(state["credentialsFile"]).read_text())
    return ObjectStore.from_uri(state["root"], endpoint=state["endpoint"], env={**os.environ, **creds}), state


def _wait_for_ppo_checkpoint(proc: subprocess.Popen, out: Path, deadline: float) -> int:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before PPO wrote a checkpoint")
        try:
            store, state = _store_for(out)
            ckpts = store.list_checkpoints(f"{state['root']}/ppo/ckpt")
        except Exception:  # noqa: BLE001 - run.json or the server not there yet
            ckpts = []
        if ckpts:
            return ckpts[-1][0]
        time.sleep(2)
    raise AssertionError("PPO wrote no checkpoint in time")


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> TinyRun:
    out = tmp_path_factory.mktemp("tiny-run") / "out"
    cmd = [*kuberlhf(), "run", str(EXAMPLE), "--output-dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    first_log = out.parent / "first.log"
    with open(first_log, "wb") as log:
        # its own process group: killing the group is what a terminal's Ctrl-\ or an OOM-killed session does
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=REPO)
        try:
            step = _wait_for_ppo_checkpoint(proc, out, time.monotonic() + 900)
            tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    # torch's elastic launcher puts the ranks in their own session; they notice the dead node process and exit
    # by themselves within seconds. Whatever is still alive after 30 s is an orphan.
    orphans = _alive(tree)
    deadline = time.monotonic() + 30
    while orphans and time.monotonic() < deadline:
        time.sleep(1)
        orphans = _alive(tree)
    for pid in orphans:  # do not leave them running whatever the assertion says
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).kill()
    second = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            timeout=900)
    return TinyRun(out=out, first_log=first_log.read_text(errors="replace"),
                   second_log=second.stdout.decode(errors="replace"), killed_at_step=step, orphans=orphans,
                   wall_s=time.monotonic() - t0, second_rc=second.returncode)
