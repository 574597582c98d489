#!/usr/bin/env bash
# Builds the Kubeflow training-operator's PyTorchJob controller (v1) from its Go module into the e2e tool cache,
# for bench/operator_scale.py's side-by-side run: e2e/tools/kubeflow/main.go wires upstream's controller into a
# manager with the client QPS as a flag. Only the bench calls this; CI never builds it.
#
#   e2e/tools/kubeflow.sh              build if missing, print the binary's path
#   e2e/tools/kubeflow.sh --regenerate rewrite e2e/tools/kubeflow/go.mod and go.sum from the pinned version
#
# Environment: WHETSTONE_K8S_BIN (cache root, default ~/.cache/whetstone/k8s-bin), BUILD_TIMEOUT (seconds).
set -euo pipefail

VERSION="${KUBEFLOW_TRAINING_OPERATOR_VERSION:-v1.8.1}"
MODULE=github.com/kubeflow/training-operator
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${WHETSTONE_K8S_BIN:-$HOME/.cache/whetstone/k8s-bin}"
OUT="$ROOT/kubeflow-training-operator-$VERSION"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod GOMAXPROCS="${GOMAXPROCS:-2}"

log() { printf '[kubeflow %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

generate() {
  local d="$1"
  cd "$d"
  rm -f go.mod go.sum
  go mod init whetstone.invalid/e2e-tools/kubeflow >/dev/null 2>&1
  go mod edit -go=1.26.0
  go get "$MODULE@$VERSION"
  go mod tidy
}

if [[ "${1:-}" == "--regenerate" ]]; then
  generate "$HERE/kubeflow"
  exit 0
fi
if [[ -x "$OUT/training-operator" ]]; then
  echo "$OUT/training-operator"
  exit 0
fi
work="$ROOT/.work/kubeflow"
rm -rf "$work" && mkdir -p "$work" && cp "$HERE/kubeflow/main.go" "$work/"
if [[ -f "$HERE/kubeflow/go.mod" ]]; then
  cp "$HERE/kubeflow/go.mod" "$HERE/kubeflow/go.sum" "$work/"
else
  ( generate "$work" ) >&2
fi
log "training-operator $VERSION: building (a few minutes on 2 cores)"
mkdir -p "$OUT.tmp"
( cd "$work" && timeout "${BUILD_TIMEOUT:-3600}" nice -n 10 go build -p 2 -trimpath -ldflags "-s -w" \
    -o "$OUT.tmp/training-operator" . )
rm -rf "$OUT" && mv "$OUT.tmp" "$OUT"
echo "$OUT/training-operator"
