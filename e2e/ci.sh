#!/usr/bin/env bash
# The e2e tier for CI: install what is missing, build (or reuse) the control-plane binaries, run `pytest e2e`.
#
#   e2e/ci.sh [PYTHON]      PYTHON: the interpreter of the project's venv (default $PYTHON, else python3)
#
# Works on a fresh machine with Go >= 1.26 and the package registries: apt for openssl/iproute2, pip for the Python
# packages, the Go module proxy for the binaries (cold build ~30-40 min on 2 cores, cached in
# ~/.cache/whetstone/k8s-bin and Go's own caches afterwards).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
PYTHON="${1:-${PYTHON:-python3}}"
E2E_TIMEOUT="${E2E_TIMEOUT:-3600}"
say() { printf '[e2e-ci %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v flock >/dev/null || missing+=(util-linux)
command -v ip >/dev/null || missing+=(iproute2)  # the runner's pod addresses on lo
command -v promtool >/dev/null || missing+=(prometheus)  # promtool and a real Prometheus (test_alerts, test_tryout)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v go >/dev/null || { say "Go >= 1.26 is required (Debian's golang is too old)"; exit 1; }
go_minor="$(go env GOVERSION | sed -n 's/^go1\.\([0-9]*\).*/\1/p')"
[[ -n "$go_minor" && "$go_minor" -ge 26 ]] || { say "Go >= 1.26 is required, found $(go env GOVERSION)"; exit 1; }

if ! "$PYTHON" -c 'import kubernetes, yaml, pytest' 2>/dev/null; then
  say "installing the Python packages of the e2e tier"
  "$PYTHON" -m pip install -q 'kubernetes>=31' 'pyyaml>=6' 'pytest>=8'
fi

start=$SECONDS
bash "$here/tools/build.sh" >/dev/null
say "binaries ready in $((SECONDS - start)) s"

cd "$repo"
start=$SECONDS
# `timeout` sends SIGTERM first: the session fixture turns it into KeyboardInterrupt and tears the cluster down.
status=0
WHETSTONE_E2E_NO_BUILD=1 timeout -k 60 "$E2E_TIMEOUT" "$PYTHON" -m pytest e2e -q -p no:cacheprovider || status=$?
say "pytest e2e finished in $((SECONDS - start)) s with status $status"
exit "$status"
