#!/usr/bin/env bash
# Run every test: the fast tier (units and real training of tiny models on the CPU), then the e2e tier
# against a real Kubernetes control plane started on loopback (built from Go modules on first use).
#
#   ./run-tests.sh            everything
#   ./run-tests.sh --fast     the fast tier only
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
python="$("$repo/scripts/bootstrap.sh")"

# The control plane, helm (the chart tests), gopher-lua (Argo CD health), the Prometheus Operator and
# Kueue CRDs (server-side dry-runs) and Kueue's controller manager (gang admission, e2e/test_kueue.py);
# cold: ~25 min on 2 cores plus ~15 min for kueue, then cached.
export WHETSTONE_E2E_TOOLS="${WHETSTONE_E2E_TOOLS:-kube etcd kwok helm luahealth promcrds kueuecrds kueue}"
if [[ "${1:-}" != "--fast" ]] && command -v go >/dev/null; then
  # A cold build starts now, at the lowest priority, so its module downloads and the CPU the fast tier leaves
  # idle are not wasted; e2e/ci.sh builds again (waiting on the build's lock) and owns any failure.
  setsid nice -n 19 bash "$repo/e2e/tools/build.sh" >"${TMPDIR:-/tmp}/whetstone-e2e-build.log" 2>&1 &
  early_build=$!
  trap 'kill -- "-$early_build" 2>/dev/null || true' EXIT
fi

"$(dirname "$python")/ruff" check .
"$python" -m pytest tests -q -p no:cacheprovider --durations=10
if [[ "${1:-}" != "--fast" ]]; then
  wait "${early_build:-}" 2>/dev/null || true
  bash "$repo/e2e/ci.sh" "$python"
fi
