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

"$(dirname "$python")/ruff" check .
"$python" -m pytest tests -q -p no:cacheprovider --durations=10
if [[ "${1:-}" != "--fast" ]]; then
  # The control plane, helm (the chart tests), gopher-lua (Argo CD health), the Prometheus Operator and
  # Kueue CRDs (server-side dry-runs) and Kueue's controller manager (gang admission, e2e/test_kueue.py);
  # cold: ~25 min on 2 cores plus ~15 min for kueue, then cached.
  WHETSTONE_E2E_TOOLS="${WHETSTONE_E2E_TOOLS:-kube etcd kwok helm luahealth promcrds kueuecrds kueue}" \
    bash "$repo/e2e/ci.sh" "$python"
fi
