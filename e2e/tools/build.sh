#!/usr/bin/env bash
# Builds the e2e control-plane binaries (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok,
# helm) from Go modules into a cache outside the repository, keyed by version; also the small tools of the
# deployment tests: luahealth (Argo CD's Lua runtime for health checks, e2e/tools/luahealth) and the CRDs of
# the Prometheus Operator and Kueue, read from their Go modules (promcrds, kueuecrds); and, when named, the
# Kueue controller manager itself (kueue: binary, CRDs, webhook list).
#
#   e2e/tools/build.sh              build what is missing or stale, print the bin folders
#   e2e/tools/build.sh --print      print the bin folders (KEY=DIR lines) without building
#   e2e/tools/build.sh --regenerate rewrite the wrapper go.mod/go.sum files from the pinned versions
#
# Environment: WHETSTONE_K8S_BIN (cache root, default ~/.cache/whetstone/k8s-bin), WHETSTONE_E2E_TOOLS
# (space-separated subset of "kube etcd kwok helm luahealth promcrds kueuecrds kueue"), BUILD_TIMEOUT (seconds
# per tool, default 3600).
#
# Each tool has its own wrapper module under e2e/tools/<tool>/ so that minimal version selection never mixes
# etcd's and Kubernetes' pins. The wrapper is copied into the cache before building because -mod=mod may touch
# go.mod/go.sum and the repository should stay clean.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
PROM_OPERATOR_VERSION="${PROM_OPERATOR_VERSION:-v0.85.0}"
# Kueue v0.17.0 is the release the Go proxy serves here; it pins k8s.io/* v0.35.3 (no replace directives) and
# talks to a 1.37 API server through the v1 APIs it uses.
KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${WHETSTONE_K8S_BIN:-$HOME/.cache/whetstone/k8s-bin}"
TOOLS="${WHETSTONE_E2E_TOOLS:-kube etcd kwok helm}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-3600}"

export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
# Two cores are shared with the trainer tests; keep the build polite.
export GOMAXPROCS="${GOMAXPROCS:-2}"
GO_P="${GO_P:-2}"

log() { printf '[build %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

kube_dir() { echo "$ROOT/kubernetes-$K8S_VERSION"; }
etcd_dir() { echo "$ROOT/etcd-$ETCD_VERSION"; }
kwok_dir() { echo "$ROOT/kwok-$KWOK_VERSION"; }
helm_dir() { echo "$ROOT/helm-$HELM_VERSION"; }
# Keyed by the sources: a change to main.go or the pinned gopher-lua rebuilds it.
luahealth_dir() { echo "$ROOT/luahealth-$(cat "$HERE"/luahealth/{go.mod,go.sum,main.go} | sha256sum | cut -c1-12)"; }
promcrds_dir() { echo "$ROOT/prometheus-operator-crds-$PROM_OPERATOR_VERSION"; }
kueuecrds_dir() { echo "$ROOT/kueue-crds-$KUEUE_VERSION"; }
kueue_dir() { echo "$ROOT/kueue-$KUEUE_VERSION"; }

# --- wrapper generation -------------------------------------------------------------------------------------

gen_kube() {
  local d="$HERE/kube"
  local staging="v0.${K8S_VERSION#v1.}"
  rm -rf "$d" && mkdir -p "$d" && cd "$d"
  go mod init whetstone.invalid/e2e-tools/kube >/dev/null 2>&1
  go mod edit -go=1.26.0
  # Read the upstream go.mod without fetching the whole source tree; derive the staging replaces from it
  # because the list of staging repositories drifts between minors.
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/^\s*"GoMod": "\(.*\)",\?$/\1/p')"
  [[ -f "$gomod" ]] || { log "cannot read upstream go.mod for k8s.io/kubernetes@$K8S_VERSION"; return 1; }
  local m
  for m in $(sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$gomod"); do
    go mod edit -replace="$m=$m@$staging"
  done
  # Upstream godebug settings change runtime behaviour of the binaries; keep them.
  local g
  for g in $(sed -n 's/^godebug \([a-z0-9]*=[a-z0-9.]*\)$/\1/p' "$gomod"); do go mod edit -godebug="$g"; done
  go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION"
}

gen_etcd() {
  local d="$HERE/etcd"
  rm -rf "$d" && mkdir -p "$d" && cd "$d"
  go mod init whetstone.invalid/e2e-tools/etcd >/dev/null 2>&1
  go mod edit -go=1.26.0
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
}

gen_kwok() {
  local d="$HERE/kwok"
  rm -rf "$d" && mkdir -p "$d" && cd "$d"
  go mod init whetstone.invalid/e2e-tools/kwok >/dev/null 2>&1
  go mod edit -go=1.26.0
  go get -tool "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
}

gen_helm() {
  local d="$HERE/helm"
  rm -rf "$d" && mkdir -p "$d" && cd "$d"
  go mod init whetstone.invalid/e2e-tools/helm >/dev/null 2>&1
  go mod edit -go=1.26.0
  go get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

gen_kueue() {
  local d="$HERE/kueue"
  rm -rf "$d" && mkdir -p "$d" && cd "$d"
  go mod init whetstone.invalid/e2e-tools/kueue >/dev/null 2>&1
  go mod edit -go=1.26.0
  go get -tool "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
}

# --- build ----------------------------------------------------------------------------------------------------

# Prepare a scratch copy of the committed wrapper module (or generate one there if it is not committed).
workdir_for() {
  local tool="$1" w="$ROOT/.work/$1"
  rm -rf "$w" && mkdir -p "$w"
  if [[ -f "$HERE/$tool/go.mod" ]]; then
    cp "$HERE/$tool/go.mod" "$w/"
    [[ -f "$HERE/$tool/go.sum" ]] && cp "$HERE/$tool/go.sum" "$w/"
  else
    log "no committed wrapper for $tool; generating one"
    ( HERE="$ROOT/.work"; "gen_$tool" ) >&2
  fi
  echo "$w"
}

version_ok() {
  # $1 binary, $2 text its version output must contain, $3 the version argument (default --version)
  local out
  [[ -x "$1" ]] || return 1
  out="$("$1" "${3:---version}" 2>&1 || true)"
  [[ "$out" == *"$2"* ]]
}

k8s_stamp() {
  local minor="${K8S_VERSION#v1.}" s="" p
  minor="${minor%%.*}"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    s+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    s+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  echo "$s"
}

build_kube() {
  local out; out="$(kube_dir)"
  if version_ok "$out/kube-apiserver" "Kubernetes $K8S_VERSION" \
     && version_ok "$out/kube-controller-manager" "Kubernetes $K8S_VERSION" \
     && version_ok "$out/kube-scheduler" "Kubernetes $K8S_VERSION"; then
    log "kubernetes $K8S_VERSION: cached in $out"; return 0
  fi
  local w; w="$(workdir_for kube)"
  log "kubernetes $K8S_VERSION: building (cold builds take 15-25 min on 2 cores)"
  mkdir -p "$out.tmp"
  ( cd "$w" && timeout "$BUILD_TIMEOUT" nice -n 10 go build -p "$GO_P" -trimpath \
      -ldflags "-s -w $(k8s_stamp)" -o "$out.tmp/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler )
  rm -rf "$out" && mv "$out.tmp" "$out"
  version_ok "$out/kube-apiserver" "Kubernetes $K8S_VERSION"
}

build_etcd() {
  local out; out="$(etcd_dir)"
  if version_ok "$out/etcd" "etcd Version: ${ETCD_VERSION#v}"; then log "etcd $ETCD_VERSION: cached in $out"; return 0; fi
  local w; w="$(workdir_for etcd)"
  log "etcd $ETCD_VERSION: building"
  mkdir -p "$out.tmp"
  ( cd "$w" && timeout "$BUILD_TIMEOUT" nice -n 10 go build -p "$GO_P" -trimpath -ldflags "-s -w" \
      -o "$out.tmp/etcd" go.etcd.io/etcd/server/v3 )
  rm -rf "$out" && mv "$out.tmp" "$out"
  version_ok "$out/etcd" "etcd Version: ${ETCD_VERSION#v}"
}

build_kwok() {
  local out; out="$(kwok_dir)"
  if version_ok "$out/kwok" "${KWOK_VERSION#v}"; then log "kwok $KWOK_VERSION: cached in $out"; return 0; fi
  local w; w="$(workdir_for kwok)"
  log "kwok $KWOK_VERSION: building"
  mkdir -p "$out.tmp"
  ( cd "$w" && timeout "$BUILD_TIMEOUT" nice -n 10 go build -p "$GO_P" -trimpath \
      -ldflags "-s -w" \
      -o "$out.tmp/kwok" sigs.k8s.io/kwok/cmd/kwok )
  rm -rf "$out" && mv "$out.tmp" "$out"
  version_ok "$out/kwok" "${KWOK_VERSION#v}"
}

helm_k8s_stamp() {
  local minor="${K8S_VERSION#v1.}"
  echo "-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=${minor%%.*}"
}

build_helm() {
  local out; out="$(helm_dir)"
  # The marker: built with the Kubernetes version stamped (as upstream's Makefile does), so `helm template`
  # checks a chart's kubeVersion against v1.37, not client-go's unstamped default (v1.20).
  if version_ok "$out/helm" "$HELM_VERSION" version && [[ -f "$out/.k8s-$K8S_VERSION" ]]; then
    log "helm $HELM_VERSION: cached in $out"; return 0
  fi
  local w; w="$(workdir_for helm)"
  log "helm $HELM_VERSION: building"
  mkdir -p "$out.tmp"
  ( cd "$w" && timeout "$BUILD_TIMEOUT" nice -n 10 go build -p "$GO_P" -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION $(helm_k8s_stamp)" \
      -o "$out.tmp/helm" helm.sh/helm/v3/cmd/helm )
  touch "$out.tmp/.k8s-$K8S_VERSION"
  rm -rf "$out" && mv "$out.tmp" "$out"
  version_ok "$out/helm" "$HELM_VERSION" version
}

build_luahealth() {
  local out; out="$(luahealth_dir)"
  if [[ -x "$out/luahealth" ]]; then log "luahealth: cached in $out"; return 0; fi
  local w="$ROOT/.work/luahealth"
  rm -rf "$w" && mkdir -p "$w" && cp "$HERE"/luahealth/{go.mod,go.sum,main.go} "$w/"
  log "luahealth (gopher-lua): building"
  mkdir -p "$out.tmp"
  ( cd "$w" && timeout "$BUILD_TIMEOUT" nice -n 10 go build -p "$GO_P" -trimpath -ldflags "-s -w" \
      -o "$out.tmp/luahealth" . )
  rm -rf "$out" && mv "$out.tmp" "$out"
}

# CRD YAMLs shipped inside a Go module: download the module (no build) and copy the folder out of the module
# cache. $1 module@version, $2 folder inside it, $3 output folder.
module_crds() {
  local out="$3" dir
  if compgen -G "$out/*.yaml" >/dev/null; then log "$1 CRDs: cached in $out"; return 0; fi
  log "$1 CRDs: downloading the module"
  dir="$(cd "$ROOT" && GOFLAGS= timeout "$BUILD_TIMEOUT" go mod download -json "$1" \
    | sed -n 's/^\s*"Dir": "\(.*\)",\?$/\1/p')"
  [[ -d "$dir/$2" ]] || { log "no $2 in $1"; return 1; }
  rm -rf "$out.tmp" && mkdir -p "$out.tmp" && cp "$dir/$2"/*.yaml "$out.tmp/" && chmod -R u+w "$out.tmp"
  rm -rf "$out" && mv "$out.tmp" "$out"
}

build_promcrds() {
  module_crds "github.com/prometheus-operator/prometheus-operator@$PROM_OPERATOR_VERSION" \
    example/prometheus-operator-crd "$(promcrds_dir)"
}

build_kueuecrds() {
  module_crds "sigs.k8s.io/kueue@$KUEUE_VERSION" config/components/crd/bases "$(kueuecrds_dir)"
}

# The binary has no --version flag; the module list the Go linker embeds names the Kueue version.
kueue_version_ok() {
  [[ -x "$1/kueue" && -f "$1/crds/kueue.x-k8s.io_workloads.yaml" && -f "$1/webhook-manifests.yaml" ]] || return 1
  go version -m "$1/kueue" 2>/dev/null | grep -Eq "sigs\.k8s\.io/kueue[[:space:]]+$KUEUE_VERSION([[:space:]]|\$)"
}

build_kueue() {
  local out; out="$(kueue_dir)"
  if kueue_version_ok "$out"; then log "kueue $KUEUE_VERSION: cached in $out"; return 0; fi
  local w; w="$(workdir_for kueue)"
  log "kueue $KUEUE_VERSION: building"
  rm -rf "$out.tmp" && mkdir -p "$out.tmp/crds"
  local v=sigs.k8s.io/kueue/pkg/version
  ( cd "$w" && timeout "$BUILD_TIMEOUT" nice -n 10 go build -p "$GO_P" -trimpath \
      -ldflags "-s -w -X $v.GitVersion=$KUEUE_VERSION -X $v.GitCommit=module -X $v.BuildDate=1970-01-01" \
      -o "$out.tmp/kueue" sigs.k8s.io/kueue/cmd/kueue )
  # The CRDs and the webhook list come from the same module version as the binary (its kustomize bases);
  # e2e/localcluster.py installs them with URL-based client configs.
  local src; src="$(cd "$w" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)"
  cp "$src"/config/components/crd/bases/*.yaml "$out.tmp/crds/"
  cp "$src/config/components/webhook/manifests.yaml" "$out.tmp/webhook-manifests.yaml"
  chmod -R u+w "$out.tmp"
  rm -rf "$out" && mv "$out.tmp" "$out"
  kueue_version_ok "$out"
}

print_dirs() {
  echo "KUBE_BIN_DIR=$(kube_dir)"
  echo "ETCD_BIN_DIR=$(etcd_dir)"
  echo "KWOK_BIN_DIR=$(kwok_dir)"
  echo "HELM_BIN_DIR=$(helm_dir)"
  echo "LUAHEALTH_BIN_DIR=$(luahealth_dir)"
  echo "PROM_CRDS_DIR=$(promcrds_dir)"
  echo "KUEUE_CRDS_DIR=$(kueuecrds_dir)"
  echo "KUEUE_BIN_DIR=$(kueue_dir)"
}

case "${1:-}" in
  --print) print_dirs; exit 0 ;;
  --regenerate)
    for t in $TOOLS; do log "regenerating wrapper for $t"; ( "gen_$t" ); done
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--print|--regenerate]" >&2; exit 2 ;;
esac

command -v go >/dev/null || { log "go is not installed (need Go >= 1.26)"; exit 1; }
mkdir -p "$ROOT"
# One build at a time per cache: a second caller waits instead of racing on the same output folders.
exec 9>"$ROOT/.lock"
flock 9
for t in $TOOLS; do
  start=$SECONDS
  "build_$t"
  log "$t done in $((SECONDS - start)) s"
done
print_dirs
