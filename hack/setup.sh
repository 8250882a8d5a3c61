#!/usr/bin/env bash
# Installs kuberlhf into a virtual environment (default .venv in the repo; KUBERLHF_VENV overrides).
#   hack/setup.sh          the product: trainer + operator + serving
#   hack/setup.sh --test   also the test tools and the real services the tests use (kube control plane, a current
#                          apiextensions-apiserver, chromium)
# Everything downloadable comes from PyPI or Debian; nothing is fetched at run or test time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${KUBERLHF_VENV:-$ROOT/.venv}
CACHE=${KUBERLHF_CACHE:-$HOME/.cache/kuberlhf}
say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
"$PY" -m pip install -q --upgrade pip
# torch first, from the CPU wheel on this machine's disk (a GPU machine can pre-install its CUDA build)
if ! "$PY" -c 'import torch' 2>/dev/null; then
  say "installing torch 2.13.0 (CPU)"
  "$PY" -m pip install -q torch==2.13.0
fi
extras="trainer,operator"
[ "${1:-}" = "--test" ] && extras="$extras,test"
say "installing kuberlhf[$extras] (DeepSpeed, transformers, kopf, boto3, SeaweedFS, ...)"
"$PY" -m pip install -q -e ".[$extras]"

if [ "${1:-}" = "--test" ]; then
  apt_pkgs=()
  command -v chromium >/dev/null || apt_pkgs+=(chromium)
  command -v chromedriver >/dev/null || apt_pkgs+=(chromium-driver)
  command -v shellcheck >/dev/null || apt_pkgs+=(shellcheck)
  command -v tmux >/dev/null || apt_pkgs+=(tmux)
  if [ ${#apt_pkgs[@]} -gt 0 ]; then
    say "installing Debian packages: ${apt_pkgs[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${apt_pkgs[@]}" >/dev/null
  fi
  say "installing the scan tier's scanners (checkov, trivy) into their own venv (cached in $CACHE)"
  KUBERLHF_CACHE=$CACHE bash hack/install-scanners.sh >/dev/null
  say "building/locating the kube-apiserver + kube-controller-manager + etcd for e2e tests (cached in $CACHE)"
  KUBERLHF_CACHE=$CACHE bash hack/build-control-plane.sh >/dev/null
  say "building/locating the current apiextensions-apiserver for the CRD tier (cached in $CACHE)"
  KUBERLHF_CACHE=$CACHE KUBERLHF_PYTHON=$PY bash hack/build-apiextensions.sh >/dev/null
fi
say "done: activate with 'source $VENV/bin/activate'"
