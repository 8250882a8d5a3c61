#!/usr/bin/env bash
# Fill the git-ignored wheels folder that hack/gpu-check.sh installs from on an offline GPU machine whose Python
# (3.12, x86-64, torch + transformers + peft + ... preinstalled) lacks what the check imports.
#
#   bash hack/gpu-wheels.sh [DIR]      # DIR defaults to .gpu-wheels (listed in .gitignore)
#
# Env: PYTHON (the venv whose pip downloads and whose installed versions are pinned; default .venv/bin/python,
# else python3), GPU_PY_VERSION (default 3.12). Each package is pinned to the version installed in that venv
# (the one the CPU dry run of the check is tested with), else the newest on PyPI.
#
# What the check needs that the GPU image does not have (see bench/README.md for why each):
#   deepspeed (sdist: PyPI has no wheel; built there with --no-build-isolation against the machine's own torch and
#   setuptools, so nothing needs a download) and hjson (its one dependency missing there);
#   pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions (kuberlhf's spec models; pydantic
#   needs a newer typing-extensions than the image may have);
#   datasets, dill, multiprocess, fsspec (kuberlhf's data layer; datasets caps fsspec).
# Not carried: boto3 (the check stores checkpoints under file://), fastapi/uvicorn (serving is not checked), and
# everything the image already has (torch, transformers, peft, safetensors, accelerate, numpy, pyarrow, ...).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$REPO/.gpu-wheels}"
PY_VERSION="${GPU_PY_VERSION:-3.12}"
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x "$REPO/.venv/bin/python" ]]; then
  PY="$REPO/.venv/bin/python"
else
  PY=python3
fi

WHEELS=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
        datasets dill multiprocess fsspec)
SDISTS=(deepspeed)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
           manylinux1_x86_64)

pinned() {  # NAME -> NAME==VERSION as installed in $PY's environment, else NAME
  local v
  v="$("$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1" 2>/dev/null || true)"
  if [[ -n "$v" ]]; then echo "$1==$v"; else echo "$1"; fi
}

rm -rf "$DIR"
mkdir -p "$DIR"
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done

wheel_reqs=()
for n in "${WHEELS[@]}"; do wheel_reqs+=("$(pinned "$n")"); done
sdist_reqs=()
for n in "${SDISTS[@]}"; do sdist_reqs+=("$(pinned "$n")"); done

echo "== wheels for CPython $PY_VERSION x86-64 (pins from $PY): ${wheel_reqs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${platform_args[@]}" -d "$DIR" "${wheel_reqs[@]}"
echo "== sdists (built on the GPU machine, no build isolation): ${sdist_reqs[*]}"
"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$DIR" "${sdist_reqs[@]}"

echo "== fetched into $DIR:"
for f in "$DIR"/*; do printf '  %8s  %s\n' "$(du -k "$f" | cut -f1)K" "$(basename "$f")"; done
count="$(find "$DIR" -maxdepth 1 -type f | wc -l)"
expected=$(( ${#WHEELS[@]} + ${#SDISTS[@]} ))
if [[ "$count" -ne "$expected" ]]; then
  echo "expected $expected files (one per package), got $count: two versions of one package stop the install" >&2
  exit 1
fi
size_kb="$(du -sk "$DIR" | cut -f1)"
echo "== total: $count files, $((size_kb / 1024)) MiB (${size_kb} KiB); the device tool carries at most 64 MiB"
if (( size_kb > 40 * 1024 )); then
  echo "the wheels folder is over 40 MiB: too big to travel next to the working tree" >&2
  exit 1
fi
