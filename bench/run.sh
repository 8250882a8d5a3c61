#!/usr/bin/env bash
# Every benchmark of issue 8, one after another, each printing ratios against a baseline measured in the same
# run. Not part of CI. About 10-15 minutes on 2 shared cores; results are also appended as JSON lines to
# $BENCH_RESULTS (default bench/out/results-<date>.jsonl).
#
#   bash bench/run.sh                 # all
#   bash bench/run.sh ppo sft         # a subset: ppo sft transfer operator gpu-smoke
#   bash bench/run.sh quality         # the RLHF quality suite (bench/rlhf_quality.py), not in the default list
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run bash hack/setup.sh first" >&2; exit 2; }
export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/kuberlhf/torch_extensions}"
mkdir -p bench/out
export BENCH_RESULTS="${BENCH_RESULTS:-$PWD/bench/out/results-$(date +%Y%m%d-%H%M%S).jsonl}"
# Python warnings are noise here; each benchmark prints its own summary lines.
export PYTHONWARNINGS=ignore

all=(ppo sft transfer operator gpu-smoke)
todo=("$@")
[ ${#todo[@]} -eq 0 ] && todo=("${all[@]}")
failed=()
run() {  # name, command...
  local name=$1; shift
  echo "=== $name: $* ==="
  local t0=$SECONDS
  if ! timeout "${BENCH_TIMEOUT:-900}" "$@"; then failed+=("$name"); echo "!!! $name failed" >&2; fi
  echo "=== $name took $((SECONDS - t0)) s ==="
}
for b in "${todo[@]}"; do
  case $b in
    ppo) run ppo "$PY" bench/ppo_bench.py --profile ;;
    sft) run sft "$PY" bench/sft_bench.py --profile ;;
    transfer)
      if [ -f bench/transfer_bench.py ]; then
        # upload + download of 1 GiB through SeaweedFS vs rclone through the same server (apt-get install rclone) and cp
        run transfer "$PY" bench/transfer_bench.py --size-mb 1024
      else
        echo "=== transfer: bench/transfer_bench.py (storage helper) is not there yet: skipped ==="
        failed+=(transfer)
      fi ;;
    operator) run operator "$PY" bench/operator_bench.py ;;
    gpu-smoke) run gpu-smoke "$PY" bench/gpu_bench.py --device cpu --tiny --steps 2 ;;
    # not in the default list: ~14 min on 2 idle cores (four full tiny pipelines)
    quality) BENCH_TIMEOUT=${BENCH_TIMEOUT:-2700} run quality "$PY" bench/rlhf_quality.py ;;
    *) echo "unknown benchmark $b (known: ${all[*]} quality)" >&2; exit 2 ;;
  esac
done
echo "results (JSON lines): $BENCH_RESULTS"
if [ ${#failed[@]} -gt 0 ]; then echo "failed or skipped: ${failed[*]}" >&2; exit 1; fi
