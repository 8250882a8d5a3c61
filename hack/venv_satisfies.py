"""Whether a virtual environment already holds what ``pip install -e ".[EXTRAS]"`` of this checkout would install,
so hack/setup.sh can skip pip on a re-run (pip takes seconds to find out that nothing is to do, and a fresh clone's
quick-start repeats it).

  python hack/venv_satisfies.py trainer,operator     exit 0: satisfied; exit 1: what is missing, one per line

Satisfied means: kuberlhf is installed editable from this checkout with the requirements pyproject.toml lists now
(an edited pyproject re-installs), and every requirement of the chosen extras is installed at an accepted version,
transitively (the requirements of what they require, with the extras they ask for). Run it with the venv's Python:
it reads that interpreter's installed distributions. Needs ``packaging`` (installed with kuberlhf's dependencies);
without it nothing counts as satisfied."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def pyproject_requirements(pyproject: dict, extras: Sequence[str]) -> list[str]:
    """The requirement strings of the core dependencies and the chosen extras, in pyproject order."""
    project = pyproject["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r} (it has {', '.join(sorted(optional))})")
        reqs += optional[extra]
    return reqs


def unmet(requirements: Iterable[str]) -> list[str]:
    """What is missing for ``requirements`` in this interpreter, transitively (empty when all is installed)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    problems: list[str] = []
    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{req}: not installed")
            continue
        if not req.specifier.contains(dist.version, prereleases=True):
            problems.append(f"{req}: {dist.version} is installed")
            continue
        for sub in dist.requires or []:
            r = Requirement(sub)
            # a dependency of one of the extras asked for: "extra == 'x'" holds for one of them
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                r.marker = None
                stack.append(r)
    return problems


def editable_problems(root: Path, requirements: Sequence[str]) -> list[str]:
    """Why the installed kuberlhf is not this checkout's editable install of these requirements ([] if it is)."""
    try:
        dist = metadata.distribution("kuberlhf")
    except metadata.PackageNotFoundError:
        return ["kuberlhf: not installed"]
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct.get("url", "")
    if not direct.get("dir_info", {}).get("editable") or Path(url.removeprefix("file://")).resolve() != root.resolve():
        return [f"kuberlhf: installed from {url or 'an index'}, not editable from {root}"]
    from packaging.requirements import Requirement

    def core(text: str) -> str:  # the installed metadata marks each extra's requirements "; extra == '...'"
        req = Requirement(text)
        req.marker = None
        return str(req)

    installed = {core(r) for r in dist.requires or []}
    stale = sorted(w for w in map(core, requirements) if w not in installed)
    return [f"kuberlhf: its installed metadata lacks {s} (pyproject.toml changed since)" for s in stale]


def main(argv: Sequence[str]) -> int:
    import tomllib

    extras = [e for e in (argv[0] if argv else "").split(",") if e]
    try:
        import packaging  # noqa: F401 - only to know it is there
    except ImportError:
        print("packaging: not installed")
        return 1
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = pyproject_requirements(pyproject, extras)
    problems = editable_problems(ROOT, reqs) or unmet(reqs)
    print("\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
