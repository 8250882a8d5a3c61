"""The scan tier: real scanners over everything kuberlhf puts on a cluster (render.py): checkov's and Trivy's
built-in Kubernetes checks (offline), and the Pod Security Standards restricted profile on every pod template.
Zero failures, except the entries of allowlist.yaml, each with the reason a reviewer accepted it; an entry that no
longer matches anything fails too (the allowlist only shrinks with the code)."""

from __future__ import annotations

import fnmatch
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml

from scan import pss
from scan.render import CHART_MODES, chart_objects, example_children, examples

HERE = Path(__file__).resolve().parent
ALLOWLIST = HERE / "allowlist.yaml"


def _sets() -> dict[str, list[dict[str, Any]]]:
    sets = {f"chart-{mode}": chart_objects(mode) for mode in CHART_MODES}
    sets.update({f"example-{p.stem}": example_children(p) for p in examples()})
    return sets


Spans = dict[str, list[tuple[int, int, str]]]


def _write(root: Path, sets: dict[str, list[dict[str, Any]]]) -> Spans:
    """One multi-document file per set (scanners take minutes per file on a loaded machine otherwise), and for
    each file the line span of every object: path -> [(first line, last line, "<set>:<Kind>/<name>")]."""
    spans: Spans = {}
    root.mkdir(parents=True)
    for set_name, objects in sets.items():
        lines: list[str] = []
        entries = []
        for o in objects:
            text = yaml.safe_dump(o).splitlines()
            lines.append("---")
            entries.append((len(lines), len(lines) + len(text), f"{set_name}:{o['kind']}/{o['metadata']['name']}"))
            lines += text
        (root / f"{set_name}.yaml").write_text("\n".join(lines) + "\n")
        spans[f"{set_name}.yaml"] = entries
    return spans


def _object_at(spans: Spans, path: str, line: int) -> str:
    name = Path(path).name
    return next(ident for first, last, ident in spans[name] if first <= line <= last)


def _checkov(binary: Path, root: Path, spans: Spans) -> set[tuple[str, str, str]]:
    proc = subprocess.run(
        [
            str(binary),
            "-d",
            str(root),
            "--framework",
            "kubernetes",
            "-o",
            "json",
            "--quiet",
            "--compact",
            "--skip-download",
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    reports = json.loads(proc.stdout)
    out = set()
    for report in reports if isinstance(reports, list) else [reports]:
        for f in (report.get("results") or {}).get("failed_checks") or []:
            out.add(("checkov", f["check_id"], _object_at(spans, f["file_path"], f["file_line_range"][0])))
    return out


def _trivy(binary: Path, root: Path, spans: Spans, cache: Path) -> set[tuple[str, str, str]]:
    proc = subprocess.run(
        [
            str(binary),
            "config",
            "--skip-check-update",
            "--timeout",
            "30m",
            "--cache-dir",
            str(cache),
            "--format",
            "json",
            "--quiet",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = set()
    for result in json.loads(proc.stdout).get("Results") or []:
        for m in result.get("Misconfigurations") or []:
            if m["Status"] == "FAIL":
                line = (m.get("CauseMetadata") or {}).get("StartLine") or 0
                out.add(("trivy", m["ID"], _object_at(spans, result["Target"], line)))
    return out


def _pss(sets: dict[str, list[dict[str, Any]]]) -> set[tuple[str, str, str]]:
    out = set()
    for set_name, objects in sets.items():
        for ident, spec in pss.pod_templates(objects):
            for v in pss.violations(spec):
                out.add(("pss-restricted", v.split(":", 1)[0], f"{set_name}:{ident}"))
    return out


def _allowed(finding: tuple[str, str, str], entry: dict[str, Any]) -> bool:
    scanner, check, obj = finding
    return (
        entry["scanner"] == scanner
        and entry["check"] == check
        and any(fnmatch.fnmatchcase(obj, pattern) for pattern in entry["objects"])
    )


def test_allowlist_entries_have_reasons() -> None:
    entries = yaml.safe_load(ALLOWLIST.read_text())
    for e in entries:
        assert set(e) == {"scanner", "check", "objects", "reason"}, e
        assert e["scanner"] in ("checkov", "trivy", "pss-restricted") and e["objects"], e
        assert len(e["reason"]) > 30 and "\n" not in e["reason"].strip(), e


def test_pss_checker_catches_what_the_standard_forbids() -> None:
    good = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "c", "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
        ],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
    }
    assert pss.violations(good) == []
    for broken, rule in [
        ({"hostNetwork": True}, "Host Namespaces"),
        ({"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}, "HostPath Volumes"),
        ({"securityContext": {"runAsNonRoot": True}}, "Seccomp"),
        ({"securityContext": {"seccompProfile": {"type": "RuntimeDefault"}}}, "Running as Non-root"),
        (
            {
                "containers": [
                    {
                        "name": "c",
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},
                        },
                    }
                ]
            },
            "Capabilities",
        ),
        (
            {"containers": [{"name": "c", "securityContext": {"capabilities": {"drop": ["ALL"]}}}]},
            "Privilege Escalation",
        ),
    ]:
        spec = {**good, **broken}
        assert any(v.startswith(rule) for v in pss.violations(spec)), (broken, pss.violations(spec))


def test_every_rendered_object_passes_the_scanners(scanners, tmp_path: Path) -> None:
    sets = _sets()
    names = _write(tmp_path / "objects", sets)
    # the two scanners at once (each is one process, mostly on one core): the scan tier's wall time is the slower one's
    with ThreadPoolExecutor(max_workers=2) as pool:
        checkov = pool.submit(_checkov, scanners["checkov"], tmp_path / "objects", names)
        trivy = pool.submit(_trivy, scanners["trivy"], tmp_path / "objects", names, tmp_path / "trivy-cache")
        findings = checkov.result() | trivy.result() | _pss(sets)
    entries = yaml.safe_load(ALLOWLIST.read_text())
    unexplained = sorted(f for f in findings if not any(_allowed(f, e) for e in entries))
    stale = [e for e in entries if not any(_allowed(f, e) for f in findings)]
    report = "\n".join(f"  {s} {c} {o}" for s, c, o in unexplained)
    assert not unexplained, f"{len(unexplained)} failed checks not in tests/scan/allowlist.yaml:\n{report}"
    assert not stale, f"allowlist entries that match nothing any more (remove them): {stale}"
    assert any(f[0] == "checkov" for f in findings) and any(f[0] == "trivy" for f in findings)  # both ran


@pytest.mark.parametrize("mode", sorted(CHART_MODES))
def test_chart_pods_pass_the_restricted_profile(mode: str) -> None:
    for ident, spec in pss.pod_templates(chart_objects(mode)):
        assert pss.violations(spec) == [], f"{mode} {ident}"
