#!/usr/bin/env bash
# Builds Ollama (github.com/ollama/ollama, CPU only) from the Go module proxy into
# a cache directory keyed by its version; prints that directory (it holds `ollama`).
#
# Its llama.cpp and ggml are compiled by cgo from the module's sources, but Go
# module zips drop vendor/ directories, so three headers llama.cpp vendors are
# missing: nlohmann/json.hpp and stb/stb_image.h come from Debian's
# nlohmann-json3-dev and libstb-dev (installed here when apt-get can), and
# miniaudio/miniaudio.h from the `miniaudio` sdist on PyPI. CGO_CPPFLAGS points at them.
# With --cached it never builds: it prints the directory when the binary is there, else fails.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

die() { echo "build-ollama: $*" >&2; exit 1; }
log() { echo "build-ollama: $*" >&2; }

command -v go >/dev/null 2>&1 || die "the Go toolchain is missing: install Go >= 1.26 and put 'go' on PATH"
goversion=$(go env GOVERSION)
cache_root=${LLAMAOPS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llamaops}
out="$cache_root/bin/ollama-${OLLAMA_VERSION}_${goversion}"
if [ -x "$out/ollama" ]; then echo "$out"; exit 0; fi
[ "${1:-}" = "--cached" ] && die "no ollama in $out yet; $0 (without --cached) builds it"

work="$cache_root/build/ollama-${OLLAMA_VERSION}"
mkdir -p "$out" "$work/include/miniaudio"

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
[ -f /usr/include/nlohmann/json.hpp ] || missing+=(nlohmann-json3-dev)
[ -f /usr/include/stb/stb_image.h ] || missing+=(libstb-dev)
if [ ${#missing[@]} -gt 0 ]; then
  pkgs=("${missing[@]}")
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing ${pkgs[*]} (Debian packages)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"; } >"$work/apt.log" 2>&1 \
      || die "apt-get install ${pkgs[*]} failed: $(tail -n 3 "$work/apt.log")"
  else
    die "missing: ${pkgs[*]} (Debian/Ubuntu packages; install them, e.g. sudo apt-get install ${pkgs[*]})"
  fi
fi

header="$work/include/miniaudio/miniaudio.h"
if [ ! -s "$header" ]; then
  py=${PYTHON:-python3}
  [ -x "$here/../.venv/bin/python" ] && py="$here/../.venv/bin/python"
  log "fetching miniaudio.h from the miniaudio sdist on PyPI"
  rm -rf "$work/sdist"
  "$py" -m pip download -q --no-deps --no-binary :all: -d "$work/sdist" "miniaudio==1.71" >"$work/pip.log" 2>&1 \
    || die "pip download miniaudio==1.71 failed (it supplies miniaudio.h): $(tail -n 3 "$work/pip.log")"
  tar -xzf "$work"/sdist/miniaudio-1.71.tar.gz -O miniaudio-1.71/miniaudio/miniaudio.h > "$header.tmp" \
    || die "miniaudio-1.71.tar.gz holds no miniaudio/miniaudio.h"
  mv "$header.tmp" "$header"
fi

go list -m -json "github.com/ollama/ollama@$OLLAMA_VERSION" >/dev/null 2>"$work/proxy.err" || \
  die "cannot fetch github.com/ollama/ollama@$OLLAMA_VERSION from $(go env GOPROXY): $(tail -n 3 "$work/proxy.err")"
log "building ollama $OLLAMA_VERSION (cgo: llama.cpp and ggml for this CPU; a few minutes)"
# The module's go.mod has no replace lines, so `go install` builds it as published.
GOFLAGS=-mod=mod CGO_ENABLED=1 CGO_CPPFLAGS="-I$work/include" GOBIN="$work/gobin" \
  go install -trimpath -ldflags "-s -w -X github.com/ollama/ollama/version.Version=${OLLAMA_VERSION#v}" \
  "github.com/ollama/ollama@$OLLAMA_VERSION" 2>"$work/build.err" \
  || die "go install github.com/ollama/ollama@$OLLAMA_VERSION failed: $(grep -v '^go: downloading' "$work/build.err" | tail -n 15)"
mv "$work/gobin/ollama" "$out/ollama"
echo "$out"
