"""A stage that fails stops the run: non-zero exit, the stage's own last log lines, no later stage started."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def test_failing_stage_stops_the_run_with_its_log_tail(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "examples" / "tiny-cpu.yaml").read_text())
    doc["spec"]["data"]["datasets"] = [str(tmp_path / "missing-pairs.jsonl")]
    doc["spec"]["stages"]["sft"]["gpusPerNode"] = 1
    manifest = tmp_path / "broken-data.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    exe = Path(sys.executable).parent / "kuberlhf"
    res = subprocess.run([str(exe), "run", str(manifest), "--output-dir", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "stage sft failed on node 0" in res.stderr
    assert "missing-pairs.jsonl" in res.stderr  # the stage's own error, from its log tail
    assert "run the same command again" in res.stderr
    assert "step 2: reward model" not in res.stdout  # nothing after the failed stage started
    assert list((out / "logs").glob("sft-attempt0-node0.log"))
