#!/usr/bin/env bash
# The kind quick-start, end to end: a kind cluster, both images built and loaded (the trainer's CPU variant), the
# chart installed with the in-cluster SeaweedFS S3, examples/s3-secret.yaml + examples/tiny-cpu.yaml applied,
# a wait for phase Succeeded, and one chat request through `kubectl port-forward`.
#
# Needs docker, kind, kubectl and curl; helm is used from PATH, else hack/helm.sh (PyPI-shipped Helm 3.17.2).
# Environment: CLUSTER (default kuberlhf), KIND_NODE_IMAGE (default: kind's), TIMEOUT_MIN (default 60),
#              KEEP_CLUSTER=1 to keep the cluster afterwards, SKIP_BUILD=1 to reuse already built images.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CLUSTER=${CLUSTER:-kuberlhf}
NS=kuberlhf
RELEASE=kuberlhf
PIPELINE=tiny-cpu
OPERATOR_IMAGE=kuberlhf-operator:dev
TRAINER_IMAGE=kuberlhf-trainer:dev-cpu
TIMEOUT_MIN=${TIMEOUT_MIN:-60}
LOCAL_PORT=${LOCAL_PORT:-18000}

say() { printf '\033[1m[kind-e2e]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[kind-e2e] %s\033[0m\n' "$*" >&2; exit 1; }

for tool in docker kind kubectl curl; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see docs/kubernetes.md, kind quick-start)"
done
if command -v helm >/dev/null; then HELM=(helm); else HELM=(bash "$ROOT/hack/helm.sh"); fi

PF_PID=""
cleanup() {
  local rc=$?
  if [ -n "$PF_PID" ]; then kill "$PF_PID" 2>/dev/null || true; fi
  if [ "$rc" -ne 0 ]; then
    say "failed (exit $rc); state for debugging:"
    kubectl -n "$NS" get rlhf,jobs,pods,svc -o wide 2>/dev/null || true
    kubectl -n "$NS" describe rlhf "$PIPELINE" 2>/dev/null | tail -n 30 || true
    kubectl -n "$NS" logs "deploy/$RELEASE" --tail=50 2>/dev/null || true
  fi
  if [ "${KEEP_CLUSTER:-0}" != 1 ] && [ "$rc" -eq 0 ]; then
    say "deleting kind cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
    kind delete cluster --name "$CLUSTER" || true
  fi
}
trap cleanup EXIT

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  say "reusing kind cluster $CLUSTER"
else
  say "creating kind cluster $CLUSTER"
  kind_args=(create cluster --name "$CLUSTER" --wait 120s)
  if [ -n "${KIND_NODE_IMAGE:-}" ]; then kind_args+=(--image "$KIND_NODE_IMAGE"); fi
  kind "${kind_args[@]}"
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  say "building $OPERATOR_IMAGE and $TRAINER_IMAGE"
  docker build --target operator -t "$OPERATOR_IMAGE" .
  docker build --target trainer --build-arg TRAINER_VARIANT=cpu -t "$TRAINER_IMAGE" .
fi
say "loading images into kind"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$TRAINER_IMAGE"

say "namespace $NS and the S3 credentials (used by SeaweedFS and by the pipeline)"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$NS" apply -f examples/s3-secret.yaml

say "installing the chart (operator + CRD + in-cluster SeaweedFS)"
"${HELM[@]}" upgrade --install "$RELEASE" charts/kuberlhf --namespace "$NS" \
  --values hack/kind-values.yaml --wait --timeout 5m
kubectl -n "$NS" rollout status "deploy/$RELEASE" --timeout=180s
kubectl -n "$NS" rollout status "deploy/$RELEASE-s3" --timeout=180s
"${HELM[@]}" test "$RELEASE" --namespace "$NS" --timeout 3m

say "applying examples/$PIPELINE.yaml"
kubectl -n "$NS" apply -f "examples/$PIPELINE.yaml"

say "waiting up to ${TIMEOUT_MIN} min for phase Succeeded"
deadline=$(( $(date +%s) + TIMEOUT_MIN * 60 ))
last=""
while :; do
  phase=$(kubectl -n "$NS" get rlhf "$PIPELINE" -o jsonpath='{.status.phase}' 2>/dev/null || true)
  stage=$(kubectl -n "$NS" get rlhf "$PIPELINE" -o jsonpath='{.status.stage}' 2>/dev/null || true)
  if [ "$phase/$stage" != "$last" ]; then say "phase=${phase:-<none>} stage=${stage:-<none>}"; last="$phase/$stage"; fi
  case "$phase" in
    Succeeded) break ;;
    Failed) die "pipeline $PIPELINE failed" ;;
  esac
  [ "$(date +%s)" -lt "$deadline" ] || die "pipeline $PIPELINE not Succeeded after ${TIMEOUT_MIN} min"
  sleep 10
done

say "chat: port-forward svc/$PIPELINE-chat to 127.0.0.1:$LOCAL_PORT"
kubectl -n "$NS" rollout status "deploy/$PIPELINE-chat" --timeout=300s
kubectl -n "$NS" port-forward "svc/$PIPELINE-chat" "$LOCAL_PORT:8000" >/dev/null &
PF_PID=$!
for _ in $(seq 1 30); do
  if curl -fsS "http://127.0.0.1:$LOCAL_PORT/readyz" >/dev/null 2>&1; then break; fi
  sleep 1
done
model=$(curl -fsS "http://127.0.0.1:$LOCAL_PORT/v1/models" | sed -n 's/.*"id" *: *"\([^"]*\)".*/\1/p' | head -n 1)
[ -n "$model" ] || die "GET /v1/models returned no model id"
reply=$(curl -fsS "http://127.0.0.1:$LOCAL_PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$model\", \"max_tokens\": 32, \"messages\": [{\"role\": \"user\", \"content\": \"Hello, who are you?\"}]}")
printf '%s\n' "$reply" | grep -q '"choices"' || die "chat request failed: $reply"
say "chat reply: $reply"
say "OK: kind cluster $CLUSTER ran $PIPELINE end to end"
