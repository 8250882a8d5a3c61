#!/usr/bin/env bash
# Installs everything the tests need (hack/setup.sh --test), then runs ruff and the whole test suite,
# end-to-end tiers included. Extra arguments go to pytest.
# The tests run on KUBERLHF_TEST_WORKERS pytest-xdist workers (default 2, 0 = one process): one work unit per
# module (the e2e and serving directories one unit each, for their shared servers), longest first (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh --test
VENV=${KUBERLHF_VENV:-$PWD/.venv}
export PATH=$VENV/bin:$PATH
export KUBERLHF_CACHE=${KUBERLHF_CACHE:-$HOME/.cache/kuberlhf}
echo "[test] ruff"
ruff check .
echo "[test] pytest"
workers=${KUBERLHF_TEST_WORKERS:-2}
parallel=()
[ "$workers" != 0 ] && parallel=(-n "$workers")
# CPU time against wall time says how busy the cores were (user + sys count every test process and its children)
TIMEFORMAT='[test] pytest: %R s wall, %U s user + %S s sys CPU'
time python -m pytest -p no:cacheprovider -ra --durations=30 "${parallel[@]}" "$@"
