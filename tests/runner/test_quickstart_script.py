"""hack/quickstart.sh (the README's first command) is correct shell and runs the documented steps."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quickstart_passes_shellcheck_and_runs_the_tiny_example() -> None:
    script = REPO / "hack" / "quickstart.sh"
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: run `bash hack/setup.sh --test`"
    res = subprocess.run([shellcheck, "-x", str(script)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stdout + res.stderr
    text = script.read_text()
    assert "bash hack/setup.sh" in text
    assert "kuberlhf run examples/tiny-cpu.yaml" in text
    assert 'kuberlhf chat --model "$MODEL"' in text and "--message" in text
