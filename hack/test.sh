#!/usr/bin/env bash
# Installs everything the tests need (hack/setup.sh --test), then runs ruff and the whole test suite,
# end-to-end tiers included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh --test
VENV=${KUBERLHF_VENV:-$PWD/.venv}
export PATH=$VENV/bin:$PATH
export KUBERLHF_CACHE=${KUBERLHF_CACHE:-$HOME/.cache/kuberlhf}
echo "[test] ruff"
ruff check .
echo "[test] pytest"
exec python -m pytest -p no:cacheprovider -ra --durations=30 "$@"
