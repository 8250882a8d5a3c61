#!/usr/bin/env bash
# The GPU check (issue 11): on a single-GPU Linux machine with no network whose python3 has torch (CUDA),
# transformers, peft, ... but not deepspeed, pydantic, datasets, install those from the wheels folder made by
# hack/gpu-wheels.sh, install kuberlhf itself without dependencies, then run every case of bench/gpu_check.py
# (SFT / reward / PPO at ZeRO-2 and ZeRO-3, bf16 and fp16, hybrid engine on and off, exports reloaded with plain
# from_pretrained) in under 8 minutes of wall clock, writing gpu-check.json, gpu-check.log and
# gpu-check-summary.txt to OUT_DIR. Issue 14's part: every stage case records its peak GPU memory per phase (ZeRO-3
# loading included), reloads its 16-bit export, and puts the memory planner's estimate next to the measured peak
# ("planner" in the JSON, "planner X GiB = Rx peak" in the summary) and its host estimate next to the peak RSS;
# sft-z2-bf16's mid-run checkpoint is saved in the background (the state copied off the GPU on the training thread,
# written and uploaded in a thread) and must be committed ("checkpoints_committed").
#
#   bash hack/gpu-check.sh [OUT_DIR] [-- ARGS OF bench/gpu_check.py]   # OUT_DIR: $OUT, else ./gpu-check-out
#   bash hack/gpu-check.sh --cpu [OUT_DIR] [-- ARGS]                    # CPU dry run (what the test suite runs)
#
# Env: PYTHON (default python3), GPU_WHEELS (default .gpu-wheels), GPU_CHECK_BUDGET_S (whole run, install
# included; default 450, 1800 with --cpu), GPU_CHECK_SITE (install target, default /tmp/kuberlhf-gpu-check-site).
# Every case runs in its own process with a hard time limit; a failing case is recorded and the next one runs.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cpu=0
if [[ "${1:-}" == "--cpu" ]]; then
  cpu=1
  shift
fi
OUT_DIR="${OUT:-$REPO/gpu-check-out}"
if [[ $# -gt 0 && "$1" != "--" ]]; then
  OUT_DIR="$1"
  shift
fi
if [[ "${1:-}" == "--" ]]; then shift; fi
PY="${PYTHON:-python3}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-450}"
if [[ $cpu -eq 1 ]]; then BUDGET_S="${GPU_CHECK_BUDGET_S:-1800}"; fi  # the limits are sized for a GPU
WHEELS="${GPU_WHEELS:-$REPO/.gpu-wheels}"
SITE="${GPU_CHECK_SITE:-/tmp/kuberlhf-gpu-check-site}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/gpu-check.log"
: >"$LOG"
INSTALL_INFO="$(mktemp)"
trap 'rm -f "$INSTALL_INFO"' EXIT
start=$SECONDS

steps=()
step() {  # NAME COMMAND...: run, log, and remember rc + seconds for the report
  local name=$1 t0=$SECONDS rc=0
  shift
  echo "== $name: $*" | tee -a "$LOG"
  "$@" >>"$LOG" 2>&1 || rc=$?
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}")
  if [[ $rc -ne 0 ]]; then echo "   $name failed (rc $rc): see $LOG" | tee -a "$LOG"; fi
  return $rc
}

if [[ $cpu -eq 1 ]]; then
  # the tree's code on the current interpreter (the test suite's venv has every dependency)
  export PYTHONPATH="$REPO/trainer_image:$REPO/operator${PYTHONPATH:+:$PYTHONPATH}"
  export DS_ACCELERATOR=cpu
  args=(--cpu)
else
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  sdists=("$WHEELS"/*.tar.gz)
  shopt -u nullglob
  if [[ ${#wheels[@]} -eq 0 && ${#sdists[@]} -eq 0 ]]; then
    echo "no wheels in $WHEELS: run 'bash hack/gpu-wheels.sh' on a machine with PyPI first" | tee -a "$LOG" >&2
    exit 2
  fi
  # the interpreter's own bin first: DeepSpeed's JIT builds call `ninja` (the image has it as a pip package there)
  PATH="$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))'):$PATH"
  export PATH
  pip_install=("$PY" -m pip install -q --no-index --no-deps --no-cache-dir --upgrade --target "$SITE")
  rm -rf "$SITE"
  status=0
  if [[ ${#wheels[@]} -gt 0 ]]; then step wheels "${pip_install[@]}" --no-compile "${wheels[@]}" || status=1; fi
  # deepspeed has no wheel: build its sdist against this machine's torch and setuptools (no download);
  # DS_BUILD_OPS=0: every op is JIT-built on first use, as on PyPI installs
  if [[ ${#sdists[@]} -gt 0 ]]; then
    step sdists env DS_BUILD_OPS=0 "${pip_install[@]}" --no-build-isolation "${sdists[@]}" || status=1
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  # kuberlhf itself, without dependencies; if packaging fails the check still runs the tree's code (and says so)
  if ! step kuberlhf "${pip_install[@]}" --no-build-isolation "$REPO"; then
    export PYTHONPATH="$REPO/trainer_image:$REPO/operator:$PYTHONPATH"
    status=1
  fi
  step imports "$PY" -c "import deepspeed, pydantic, datasets, kuberlhf.stages.launch; print(kuberlhf.__file__)" ||
    status=1
  if [[ $status -ne 0 ]]; then echo "   install incomplete: the cases run anyway and show what breaks" | tee -a "$LOG"; fi
  args=()
fi
printf '{"steps": [%s], "seconds": %d}\n' "$(IFS=,; echo "${steps[*]:-}")" $((SECONDS - start)) >"$INSTALL_INFO"

left=$((BUDGET_S - (SECONDS - start)))
if [[ $left -lt 30 ]]; then left=30; fi
rc=0
"$PY" "$REPO/bench/gpu_check.py" --out "$OUT_DIR" --budget-s "$left" --install-info "$INSTALL_INFO" \
  "${args[@]}" "$@" || rc=$?
echo "== gpu check: rc $rc, $((SECONDS - start)) s in all; results in $OUT_DIR"
exit $rc
