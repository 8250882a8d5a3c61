"""A stage that fails stops the run: non-zero exit, the stage's own last log lines, no later stage started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_failing_stage_stops_the_run_with_its_log_tail(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    # a file that exists but is not JSON lines: the preflight (which refuses a missing file before any stage)
    # cannot see it, so the stage itself fails - with the user-error exit code
    bad = tmp_path / "broken-pairs.jsonl"
    bad.write_text('{"prompt": "Human: hi Assistant:", "chosen": " hello", "rejected": " go"}\nnot json\n')
    doc["spec"]["data"]["datasets"] = [str(bad)]
    # test_e2e_tiny may run the same example in the other pytest-xdist worker: each run keeps its node scratch in
    # its own output directory (tests/runner/test_scratch.py)
    doc["spec"]["stages"]["sft"]["gpusPerNode"] = 1
    manifest = tmp_path / "tiny-cpu.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    exe = Path(sys.executable).parent / "kuberlhf"
    res = subprocess.run(
        [str(exe), "run", str(manifest), "--output-dir", str(out)], capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert "stage sft failed on node 0 (exit code 78)" in res.stderr  # 78: the stage's user-error code
    assert "broken-pairs.jsonl' line 2 is not valid JSON" in res.stderr  # the stage's own error, from its log tail
    assert "run the same command again" in res.stderr
    assert "step 2: reward model" not in res.stdout  # nothing after the failed stage started
    assert list((out / "logs").glob("sft-attempt0-node0.log"))
