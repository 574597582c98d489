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
# cold: 38 min on 2 cores at the lowest priority beside the fast tier (Kubernetes 23, kueue 6, kwok 4, helm 3,
# etcd 1.5), then cached. A whole cold run (empty venv, model and Go caches) took 61 min: venv 3.5, fast tier 44,
# e2e 13 (2026-11-30).
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
