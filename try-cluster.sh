#!/usr/bin/env bash
# Try Whetstone on a real Kubernetes control plane on this machine, in one command: start the local cluster
# (e2e/cluster up: etcd, kube-apiserver, controller-manager, scheduler on loopback, kwok's fake GPU nodes and
# two "runner" nodes whose pods really run here), install the Helm chart into it with the local profile
# (helm/whetstone/values-local.yaml), fine-tune the tiny example to Succeeded under the operator's pod, and
# leave everything running to explore.
#
#   ./try-cluster.sh          start, install, run the example (first run: builds the cluster, ~20 min)
#   ./try-cluster.sh down     stop the cluster and remove its state
#
# Needs Linux, Python >= 3.11, Go >= 1.26, openssl, and root for the pod runner (mount namespaces, pod
# addresses on lo); see e2e/README.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$repo"
say() { printf '\033[1m[try-cluster %(%H:%M:%S)T]\033[0m %s\n' -1 "$*" >&2; }
[[ -n "${NO_COLOR:-}" || ! -t 2 ]] && say() { printf '[try-cluster %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

python="$("$repo/scripts/bootstrap.sh")"
bin="$(dirname "$python")"
export PYTHON="$python" PATH="$bin:$PATH"

if [[ "${1:-}" == "down" ]]; then
  exec "$repo/e2e/cluster" down
fi
[[ $# -eq 0 ]] || { echo "usage: $0 [down]" >&2; exit 2; }

# The control plane, kwok and helm, built from Go modules once (cached in ~/.cache/whetstone/k8s-bin); the
# build script (which waits for any other build of the cache) runs only when one is missing.
dirs="$(bash "$repo/e2e/tools/build.sh" --print)"
bin_of() { sed -n "s/^$1=//p" <<<"$dirs"; }
helm="$(bin_of HELM_BIN_DIR)/helm"
for tool in "$(bin_of KUBE_BIN_DIR)/kube-apiserver" "$(bin_of ETCD_BIN_DIR)/etcd" "$(bin_of KWOK_BIN_DIR)/kwok" "$helm"; do
  if [[ ! -x "$tool" ]]; then
    say "building the control plane and helm from Go modules (first run: ~25 min on 2 cores)"
    WHETSTONE_E2E_TOOLS="kube etcd kwok helm" bash "$repo/e2e/tools/build.sh" >/dev/null
    break
  fi
done

if "$repo/e2e/cluster" status >/dev/null 2>&1; then
  say "the local cluster is already up; reusing it"
else
  say "starting the local cluster"
  "$repo/e2e/cluster" up --no-build >/dev/null
fi
export KUBECONFIG="$repo/e2e/.cluster/kubeconfig"

say "installing the chart (helm/whetstone, local profile) into namespace whetstone-system"
"$helm" upgrade --install whetstone "$repo/helm/whetstone" --namespace whetstone-system --create-namespace \
  --values "$repo/helm/whetstone/values-local.yaml" --wait --timeout 5m

job=sft-tiny-reverse
say "running the example FineTuneJob $job (manifests/examples/cluster/$job.yaml)"
kubectl create configmap whetstone-example-data \
  --from-file="$repo/manifests/examples/data/reverse-train.jsonl" \
  --from-file="$repo/manifests/examples/data/reverse-eval.jsonl" --dry-run=client -o yaml \
  | kubectl apply --server-side --field-manager=try-cluster -f - >/dev/null
kubectl delete finetunejob "$job" --ignore-not-found --wait >/dev/null
kubectl apply -f "$repo/manifests/examples/cluster/$job.yaml"
whetstone wait "ftj/$job" --for=condition=Created --timeout=5m
whetstone logs "$job" --follow
whetstone wait "ftj/$job" --for=condition=Succeeded --timeout=10m
whetstone get ftj "$job"

state_dir="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["state_dir"])' "$repo/e2e/.cluster/state.json")"
hint() { printf '  %-60s # %s\n' "$1" "$2"; }
echo
echo "The cluster is still running. In another shell:"
echo
echo "  export KUBECONFIG=$KUBECONFIG"
hint "kubectl get finetunejobs,checkpoints" "what the operator recorded"
hint "whetstone describe ftj $job" "progress, conditions, events (or kubectl describe)"
hint "kubectl get pods -A -o wide" "the operator runs in whetstone-system"
hint "whetstone plot $job --pvc-root $state_dir/runner/pvc/default" "loss curves to $job-curves.png"
hint "kubectl delete ftj $job" "then apply it again, and: whetstone logs $job -f"
echo
echo "Tools: kubectl and whetstone are in $bin; helm is $helm."
echo "Stop everything with: ./try-cluster.sh down"
