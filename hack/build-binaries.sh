#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go module proxy into a
# cache directory keyed by the pinned versions; prints that directory.
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes)
#   etcd (go.etcd.io/etcd/server/v3), kwok, helm
# A second run with the same versions builds nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

die() { echo "build-binaries: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "the Go toolchain is missing: install Go >= 1.26 (https://go.dev/doc/install) and put 'go' on PATH"
goversion=$(go env GOVERSION)

cache_root=${LLAMAOPS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamaops}
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}_${goversion}"
out="$cache_root/bin/$key"
tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm)

have_all() { local t; for t in "${tools[@]}"; do [ -x "$out/$t" ] || return 1; done; }
if have_all; then echo "$out"; exit 0; fi

mkdir -p "$out"
work="$cache_root/build/$key"
mkdir -p "$work"
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

check_proxy() {
  # One cheap request tells "no network" apart from a broken build.
  go list -m -json "$1" >/dev/null 2>"$work/proxy.err" || \
    die "cannot fetch $1 from the Go module proxy ($(go env GOPROXY)): $(tail -n 3 "$work/proxy.err")"
}

log() { echo "build-binaries: $*" >&2; }

build_kubernetes() {
  local v=$KUBERNETES_VERSION mod="$work/kubernetes"
  check_proxy "k8s.io/kubernetes@$v"
  mkdir -p "$mod"
  # The staging modules are published as v0.<minor>.<patch>; the list of them
  # comes from the tag's own go.mod, so new staging modules are picked up.
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$v"
  local staging
  staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$gomod")
  [ -n "$staging" ] || die "no staging replaces found in k8s.io/kubernetes@$v go.mod"
  local goline
  goline=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod")
  {
    echo "module llamaops.local/k8s-build"
    echo
    echo "go $goline"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    echo "replace ("
    local m
    for m in $staging; do echo "	$m => $m v0.${v#v1.}"; done
    echo ")"
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$mod" && go mod tidy -e >/dev/null 2>"$work/tidy.err") || { cat "$work/tidy.err" >&2; die "go mod tidy failed for k8s.io/kubernetes@$v"; }
  local minor=${v#v1.}; minor=${minor%%.*}
  local ld="-s -w"
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  local t
  for t in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
    [ -x "$out/$t" ] && continue
    log "building $t $v"
    (cd "$mod" && go build -trimpath -ldflags "$ld" -o "$out/$t.tmp" "k8s.io/kubernetes/cmd/$t") && mv "$out/$t.tmp" "$out/$t"
  done
}

build_etcd() {
  [ -x "$out/etcd" ] && return 0
  local v=$ETCD_VERSION mod="$work/etcd"
  check_proxy "go.etcd.io/etcd/server/v3@$v"
  mkdir -p "$mod"
  # etcd's own go.mod has replace lines, so `go install` of it fails; a tiny
  # wrapper module calling etcdmain.Main builds the same server.
  cat > "$mod/go.mod" <<GO
module llamaops.local/etcd-build

go 1.24

require go.etcd.io/etcd/server/v3 $v
GO
  cat > "$mod/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$mod" && go mod tidy >/dev/null 2>"$work/etcd-tidy.err") || { cat "$work/etcd-tidy.err" >&2; die "go mod tidy failed for etcd $v"; }
  log "building etcd $v"
  local ld="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=llamaops"
  (cd "$mod" && go build -trimpath -ldflags "$ld" -o "$out/etcd.tmp" .) && mv "$out/etcd.tmp" "$out/etcd"
}

build_install() { # name module@version [ldflags]
  local name=$1 pkg=$2 ld=${3:-"-s -w"}
  [ -x "$out/$name" ] && return 0
  check_proxy "${pkg%%/cmd/*}@${pkg##*@}"
  log "building $name ${pkg##*@}"
  GOBIN="$work/gobin" go install -trimpath -ldflags "$ld" "$pkg"
  mv "$work/gobin/$name" "$out/$name"
}

build_kubernetes
build_etcd
build_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"

have_all || die "some binaries are missing in $out"
echo "$out"
