#!/usr/bin/env bash
# Builds a real kube-apiserver + kube-controller-manager (v1.20.2, from Debian bookworm's `kubernetes`
# source package) for the e2e tests, and installs etcd from Debian. The binaries are cached outside the
# clone (KUBERLHF_CACHE, default ~/.cache/kuberlhf) keyed by version, so only a fresh machine builds
# (10-18 min on 2 cores). Prints the directory holding the binaries on its last line.
#   --packages-only   install the Debian packages the build and the tests need (Go, etcd, ...), build nothing
set -euo pipefail

VERSION=1.20.2
CACHE=${KUBERLHF_CACHE:-$HOME/.cache/kuberlhf}
OUT=$CACHE/k8s-v$VERSION
log() { printf '[control-plane] %s\n' "$*" >&2; }

need_apt=()
command -v go >/dev/null || need_apt+=(golang-go)
command -v rsync >/dev/null || need_apt+=(rsync)
command -v jq >/dev/null || need_apt+=(jq)
command -v etcd >/dev/null || need_apt+=(etcd-server)
[ -d /usr/share/gocode/src/github.com/modern-go/reflect2 ] || need_apt+=(golang-github-modern-go-reflect2-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing Debian packages: ${need_apt[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >&2
fi
[ "${1:-}" = "--packages-only" ] && exit 0

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ]; then
  log "cached binaries in $OUT"
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/k8s-build.lock"
flock 9   # two builds at once (a session and its CI) would double the 1.4 GB peak
if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ]; then echo "$OUT"; exit 0; fi

WORK=$CACHE/k8s-src
rm -rf "$WORK"; mkdir -p "$WORK/apt/lists/partial" "$WORK/src"
# A private apt config, so the machine's sources and lists stay as they are.
cat >"$WORK/apt/sources.list" <<SRC
deb-src http://deb.debian.org/debian bookworm main
SRC
APT_OPTS=(-o Dir::Etc::SourceList="$WORK/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$WORK/apt/lists" -o APT::Sandbox::User=root)
log "fetching Debian's kubernetes source package"
apt-get "${APT_OPTS[@]}" update -qq >&2
(cd "$WORK/src" && apt-get "${APT_OPTS[@]}" source --download-only kubernetes >&2)
dsc=$(ls "$WORK"/src/kubernetes_*.dsc | head -1)
(cd "$WORK/src" && dpkg-source --no-check -x "$dsc" tree >&2)
TREE=$WORK/src/tree

# Vendored reflect2 1.0.1 segfaults the apiserver on Go >= 1.18; Debian's 1.0.2 does not.
rm -rf "$TREE/vendor/github.com/modern-go/reflect2"
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 "$TREE/vendor/github.com/modern-go/reflect2"

log "building kube-apiserver and kube-controller-manager (10-18 min)"
(cd "$TREE" && GO111MODULE=off GOPROXY=off CGO_ENABLED=0 KUBE_GIT_VERSION=v$VERSION KUBE_GIT_TREE_STATE=clean \
   GOLDFLAGS="-s -w" GOFLAGS=-mod=vendor make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2) || \
(cd "$TREE" && GOPROXY=off CGO_ENABLED=0 KUBE_GIT_VERSION=v$VERSION KUBE_GIT_TREE_STATE=clean \
   GOLDFLAGS="-s -w" make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2)
mkdir -p "$OUT.tmp"
cp "$TREE"/_output/local/bin/linux/*/kube-apiserver "$TREE"/_output/local/bin/linux/*/kube-controller-manager "$OUT.tmp/"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
rm -rf "$WORK"
log "built into $OUT"
echo "$OUT"
