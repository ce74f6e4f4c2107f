#!/usr/bin/env bash
# Builds the local control plane's binaries from the Go module proxy into a
# cache directory keyed by the pinned versions; prints that directory.
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes)
#   etcd (go.etcd.io/etcd/server/v3), kwok, helm
#   kueue (sigs.k8s.io/kueue; see build_kueue), its CRDs in kueue-crds/ and
#   its manager's RBAC roles in kueue-rbac/
#   minio (github.com/minio/minio): the S3-compatible server of the trainer's S3 tests
# A second run with the same versions builds nothing. With --cached it never
# builds: it prints the directory when everything is there, else fails.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

die() { echo "build-binaries: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "the Go toolchain is missing: install Go >= 1.26 (https://go.dev/doc/install) and put 'go' on PATH"
goversion=$(go env GOVERSION)

cache_root=${LLAMAOPS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamaops}
key="k8s-${KUBERNETES_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}_kueue-${KUEUE_VERSION}_minio-${MINIO_VERSION}_${goversion}"
out="$cache_root/bin/$key"
tools=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm kueue minio)

have_crds() { compgen -G "$out/kueue-crds/*.yaml" >/dev/null; }
have_all() {
  local t
  for t in "${tools[@]}"; do [ -x "$out/$t" ] || return 1; done
  have_crds && [ -f "$out/kueue-rbac/role.yaml" ]
}
if have_all; then echo "$out"; exit 0; fi
[ "${1:-}" = "--cached" ] && die "nothing complete in $out yet; $0 (without --cached) builds it"

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

build_install() { # name package@version [ldflags]
  local name=$1 pkg=$2 ld=${3:-"-s -w"}
  [ -x "$out/$name" ] && return 0
  # The module: the package path up to /cmd/ (the whole path for a main package at the module root).
  local module="${pkg%@*}"
  module="${module%%/cmd/*}@${pkg##*@}"
  check_proxy "$module"
  local toolchain
  toolchain=$(toolchain_for "$(go list -m -f '{{.GoVersion}}' "$module" 2>/dev/null || true)")
  log "building $name ${pkg##*@}"
  GOTOOLCHAIN=$toolchain GOBIN="$work/gobin" go install -trimpath -ldflags "$ld" "$pkg"
  mv "$work/gobin/$name" "$out/$name"
}

# The GOTOOLCHAIN for a module whose go.mod says `go <version>`: ours (the
# caller's setting) when it is new enough, else that release, which the go
# command fetches from the module proxy for this one build.
toolchain_for() {
  local need=$1 have=${goversion#go}
  if [ -z "$need" ] || [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n 1)" = "$need" ]; then
    echo "${GOTOOLCHAIN:-}"
    return
  fi
  [[ $need == *.*.* ]] || need="$need.0"
  log "a module needs go $need; building it with go$need"
  echo "go$need"
}

build_kueue() {
  [ -x "$out/kueue" ] && return 0
  local v=$KUEUE_VERSION mod="$work/kueue"
  check_proxy "sigs.k8s.io/kueue@$v"
  local dir
  dir=$(go mod download -json "sigs.k8s.io/kueue@$v" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  [ -f "$dir/cmd/kueue/main.go" ] || die "could not download sigs.k8s.io/kueue@$v"
  # Out of a cluster, with its internal certificate management off, Kueue reads
  # its metrics serving certificate from a fixed path, /etc/kueue/metrics/certs;
  # the webhook's directory is configurable, this one is not. The manager is
  # built from a copy of its main package whose one change makes that path
  # $LLAMAOPS_KUEUE_METRICS_CERT_DIR when set (the fixed path otherwise); every other
  # package comes unchanged from the pinned module.
  local fixed='metricsCertPath := "/etc/kueue/metrics/certs"'
  [ "$(grep -cF "$fixed" "$dir/cmd/kueue/main.go")" = 1 ] || \
    die "sigs.k8s.io/kueue@$v cmd/kueue/main.go no longer sets its metrics certificate path as expected ('$fixed'); review the patch in $0"
  rm -rf "$mod"
  mkdir -p "$mod"
  local goline toolchain
  goline=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$dir/go.mod")
  toolchain=$(toolchain_for "$goline")
  cat > "$mod/go.mod" <<GO
module llamaops.local/kueue-build

go $goline

require sigs.k8s.io/kueue $v
GO
  sed "s#$fixed#metricsCertPath := metricsCertDir()#" "$dir/cmd/kueue/main.go" > "$mod/main.go"
  cat > "$mod/metrics_cert_dir.go" <<'GO'
package main

import "os"

// metricsCertDir is where the metrics server's tls.crt and tls.key are.
func metricsCertDir() string {
	if dir := os.Getenv("LLAMAOPS_KUEUE_METRICS_CERT_DIR"); dir != "" {
		return dir
	}
	return "/etc/kueue/metrics/certs"
}
GO
  (cd "$mod" && GOTOOLCHAIN=$toolchain go mod tidy >/dev/null 2>"$work/kueue-tidy.err") || { cat "$work/kueue-tidy.err" >&2; die "go mod tidy failed for kueue $v"; }
  log "building kueue $v"
  local ld="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$v"
  (cd "$mod" && GOTOOLCHAIN=$toolchain go build -trimpath -ldflags "$ld" -o "$out/kueue.tmp" .) && mv "$out/kueue.tmp" "$out/kueue"
}

copy_kueue_manifests() {
  have_crds && [ -f "$out/kueue-rbac/role.yaml" ] && return 0
  local v=$KUEUE_VERSION dir
  # The module's CRDs and the manager's RBAC roles, so the launcher can apply
  # them without a module cache.
  dir=$(go mod download -json "sigs.k8s.io/kueue@$v" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  compgen -G "$dir/config/components/crd/bases/*.yaml" >/dev/null || die "no CRDs in sigs.k8s.io/kueue@$v (looked in $dir/config/components/crd/bases)"
  local rbac=(role.yaml manager_secrets_role.yaml metrics_auth_role.yaml) f
  for f in "${rbac[@]}"; do
    [ -f "$dir/config/components/rbac/$f" ] || die "no config/components/rbac/$f in sigs.k8s.io/kueue@$v"
  done
  rm -rf "$out/kueue-crds.tmp" "$out/kueue-rbac.tmp"
  mkdir -p "$out/kueue-crds.tmp" "$out/kueue-rbac.tmp"
  cp "$dir"/config/components/crd/bases/*.yaml "$out/kueue-crds.tmp/"
  for f in "${rbac[@]}"; do cp "$dir/config/components/rbac/$f" "$out/kueue-rbac.tmp/"; done
  chmod 0644 "$out"/kueue-crds.tmp/*.yaml "$out"/kueue-rbac.tmp/*.yaml
  rm -rf "$out/kueue-crds" "$out/kueue-rbac"
  mv "$out/kueue-rbac.tmp" "$out/kueue-rbac"
  mv "$out/kueue-crds.tmp" "$out/kueue-crds"
}

build_kubernetes
build_etcd
build_install kwok "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
build_install helm "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
build_kueue
copy_kueue_manifests
# MinIO's RELEASE.* tags are not semantic versions, so the pin is a pseudo-version;
# its go.mod has no replace lines, so `go install` builds it as published.
build_install minio "github.com/minio/minio@$MINIO_VERSION"

have_all || die "some binaries are missing in $out"
echo "$out"
