#!/usr/bin/env bash
# Installs kuberlhf into a virtual environment (default .venv in the repo; KUBERLHF_VENV overrides).
#   hack/setup.sh          the product: trainer + operator + serving
#   hack/setup.sh --test   also the test tools and the real services the tests use (kube control plane, a current
#                          apiextensions-apiserver, chromium)
#   hack/setup.sh --bench  also the baselines the benchmarks run that are not on PyPI (Debian's rclone for
#                          bench/transfer_bench.py); CI does not run the benchmarks and does not need it
#                          (the flags combine: --test --bench)
# Everything downloadable comes from PyPI or Debian; nothing is fetched at run or test time.
# With --test, the three one-off builds (scanners, control plane, apiextensions-apiserver; each cached in
# KUBERLHF_CACHE, so a warm machine finds them in seconds) run in the background while pip installs kuberlhf: on a
# fresh machine the downloads of one overlap the compiling of another. Each prints how long it took.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${KUBERLHF_VENV:-$ROOT/.venv}
CACHE=${KUBERLHF_CACHE:-$HOME/.cache/kuberlhf}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
TEST=0
BENCH=0
for arg in "$@"; do
  case $arg in
    --test) TEST=1 ;;
    --bench) BENCH=1 ;;
    *) echo "usage: hack/setup.sh [--test] [--bench]" >&2; exit 2 ;;
  esac
done
apt_install() {  # apt_install PACKAGE...: Debian packages, with a wait for another apt's lock
  say "installing Debian packages: $*"
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "$@" >/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
extras="trainer,operator"
[ "$TEST" = 1 ] && extras="$extras,test"

jobs_dir=""
job_names=()
job_pids=()
start_job() {  # start_job NAME WHAT COMMAND...: in the background, its output in $jobs_dir/NAME.log
  local name=$1
  say "started in the background: $name ($2)"
  shift 2
  (
    start=$(date +%s)
    "$@" >"$jobs_dir/$name.log" 2>&1
    echo "$(($(date +%s) - start))" >"$jobs_dir/$name.seconds"
  ) &
  job_names+=("$name")
  job_pids+=($!)
}
# on an early exit (a failed pip install), the builds still finish: none is left running half-way
trap '[ -n "$jobs_dir" ] && { wait; rm -rf "$jobs_dir"; }' EXIT
wait_jobs() {
  local failed=0 i name
  for i in "${!job_pids[@]}"; do
    name=${job_names[$i]}
    if wait "${job_pids[$i]}"; then
      say "$name: done in $(cat "$jobs_dir/$name.seconds") s"
    else
      say "$name FAILED; the end of its output:"
      tail -n 60 "$jobs_dir/$name.log" >&2 || true
      failed=1
    fi
  done
  rm -rf "$jobs_dir"
  jobs_dir=""
  return "$failed"
}

if [ "$TEST" = 1 ]; then
  apt_pkgs=()
  command -v chromium >/dev/null || apt_pkgs+=(chromium)
  command -v chromedriver >/dev/null || apt_pkgs+=(chromium-driver)
  command -v shellcheck >/dev/null || apt_pkgs+=(shellcheck)
  command -v tmux >/dev/null || apt_pkgs+=(tmux)
  [ ${#apt_pkgs[@]} -gt 0 ] && apt_install "${apt_pkgs[@]}"
  # the control plane's Debian packages (Go, etcd, ...) before the builds: the apiextensions build needs etcd
  say "installing/locating the Debian packages of the control-plane build (Go, etcd)"
  KUBERLHF_CACHE=$CACHE bash hack/build-control-plane.sh --packages-only >/dev/null
  jobs_dir=$(mktemp -d)
  start_job scanners "checkov and trivy for the scan tier, cached in $CACHE" \
    env KUBERLHF_CACHE="$CACHE" bash hack/install-scanners.sh
  start_job control-plane "kube-apiserver + kube-controller-manager v1.20.2 for the e2e tier, cached in $CACHE" \
    env KUBERLHF_CACHE="$CACHE" bash hack/build-control-plane.sh
  start_job apiextensions "a current apiextensions-apiserver for the CRD tier, cached in $CACHE" \
    env KUBERLHF_CACHE="$CACHE" KUBERLHF_PYTHON="$PY" bash hack/build-apiextensions.sh
fi

if [ "$BENCH" = 1 ]; then
  command -v rclone >/dev/null || apt_install rclone
fi

pip_install() {
  local compile=()
  # pip byte-compiles every file it installs, most never imported (torch: 46 of its 13+46 CPU-seconds here)
  [ -z "${PYTHONDONTWRITEBYTECODE:-}" ] && compile=(--no-compile)
  "$PY" -m pip install -q "${compile[@]}" "$@"
}

# a re-run (or a venv that has it all): no installer at all, where pip took ~12 CPU-s to find nothing to do
if "$PY" hack/venv_satisfies.py "$extras" >/dev/null 2>&1; then
  say "$VENV already has kuberlhf[$extras] and everything it requires: nothing to install"
else
  "$PY" -m pip install -q --upgrade pip
  # torch first, from the CPU wheel on this machine's disk (a GPU machine can pre-install its CUDA build)
  if ! "$PY" -c 'import torch' 2>/dev/null; then
    say "installing torch 2.13.0 (CPU)"
    pip_install torch==2.13.0
  fi
  say "installing kuberlhf[$extras] (DeepSpeed, transformers, kopf, boto3, SeaweedFS, ...)"
  pip_install -e ".[$extras]"
fi

if [ "$TEST" = 1 ]; then
  say "waiting for the background builds"
  wait_jobs
fi
say "done: activate with 'source $VENV/bin/activate'"
