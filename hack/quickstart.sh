#!/usr/bin/env bash
# The README's first command: install kuberlhf, run the tiny RLHF pipeline (SFT -> reward model -> PPO with EMA
# and ptx) on this machine's CPU with an embedded S3 server, then chat with the result.
#   bash hack/quickstart.sh              output in out/tiny (re-running resumes; KUBERLHF_FRESH=1 starts over)
# No GPU, no cluster, no model hub needed. The run is ~7 minutes of CPU time (docs/local.md has the measurement).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${KUBERLHF_OUT:-out/tiny}
say() { printf '\033[1m[quickstart]\033[0m %s\n' "$*"; }

bash hack/setup.sh
VENV=${KUBERLHF_VENV:-$PWD/.venv}
export PATH=$VENV/bin:$PATH
# offline by design: the tiny model and data ship with kuberlhf, so a hub lookup could only waste time
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/kuberlhf/torch_extensions}

fresh=()
[ "${KUBERLHF_FRESH:-0}" = "1" ] && fresh=(--fresh)
say "running examples/tiny-cpu.yaml -> $OUT"
kuberlhf run examples/tiny-cpu.yaml --output-dir "$OUT" "${fresh[@]}"

MODEL=$OUT/ppo/ema
if [ -t 0 ] && [ -t 1 ]; then
  say "chat with the RLHF-trained model (it remembers the conversation: try a question, then \"Can you explain it to a child?\"; 'clear' starts over, 'quit' leaves)"
  exec kuberlhf chat --model "$MODEL"
fi
# no terminal: one scripted conversation of three turns, each follow-up about the first question's subject
say "no terminal attached: a scripted 3-turn conversation instead (interactive: kuberlhf chat --model $MODEL)"
kuberlhf chat --model "$MODEL" --seed 1 \
  --message "What is the capital of France?" \
  --message "Can you explain it to a child?" \
  --message "What else about it?"
