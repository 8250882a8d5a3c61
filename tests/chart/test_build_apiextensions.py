"""hack/build-apiextensions.sh fails, and says what to do, when its Debian suite no longer carries the package.

The suite here is a local, empty Debian repository (file: URI, no network): the script's own apt config reads
it, finds no golang-k8s-apiextensions-apiserver-dev and must exit non-zero naming the package and the fixes,
never build or skip. (The successful path is what `hack/setup.sh --test` runs; the CRD tier uses its output.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_missing_package_is_a_clear_failure(tmp_path: Path) -> None:
    if not (shutil.which("apt-get") and (shutil.which("etcd") or os.access("/usr/bin/etcd", os.X_OK))):
        pytest.fail("needs apt-get and Debian's etcd (hack/setup.sh --test installs them)", pytrace=False)
    repo = tmp_path / "debian"
    (repo / "dists/sid/main/binary-amd64").mkdir(parents=True)
    (repo / "dists/sid/main/binary-amd64/Packages").write_text("")
    (repo / "dists/sid/Release").write_text("Suite: sid\nCodename: sid\nComponents: main\nArchitectures: amd64\n")
    env = {
        **os.environ,
        "KUBERLHF_CACHE": str(tmp_path / "cache"),
        "KUBERLHF_DEBIAN_SUITE": "sid",
        "KUBERLHF_DEBIAN_MIRROR": f"[trusted=yes] file:{repo}",
    }
    proc = subprocess.run(
        ["bash", "hack/build-apiextensions.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0, proc.stderr
    assert "no longer carries golang-k8s-apiextensions-apiserver-dev" in proc.stderr
    assert "KUBERLHF_DEBIAN_MIRROR" in proc.stderr and "snapshot.debian.org" in proc.stderr
    assert not list((tmp_path / "cache").glob("apiextensions-v*")), "nothing may be cached after a failure"
