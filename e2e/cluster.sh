#!/usr/bin/env bash
# Real-cluster test of the operator: runs only against a reachable cluster, skips (exit 0) with
# the reason otherwise.
#
#   DOPD_IMAGE=registry/dopd:tag e2e/cluster.sh [path/to/dopd]
#
# Needs: KUBECONFIG (or ~/.kube/config) pointing at a cluster, and DOPD_IMAGE, an image with
# `dopd` and the test model at /models/SmolLM2-135M-Instruct.Q4_1.gguf that the cluster can pull
# (for kind: `kind load docker-image "$DOPD_IMAGE"`; for k3d: `k3d image import "$DOPD_IMAGE"`).
# Workers run on CPU (gpusPerInstance: 0), so any cluster works, GPU nodes or not.
#
# kind: `kind create cluster --name dopd`; k3d: `k3d cluster create dopd`.
#
# It installs the Helm chart (CRD, RBAC, the operator with leader election) with DOPD_IMAGE,
# applies a DopdService, waits for it to be Running, sends a chat request through the router
# (`kubectl port-forward`), sends load with `dopd bench load`, and checks that the planner made
# decisions (status history, Events).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dopd="${1:-$root/target/debug/dopd}"
export PATH="$root/.bin:$PATH"

skip() {
    echo "SKIPPED: $*"
    exit 0
}
command -v kubectl >/dev/null 2>&1 || skip "kubectl is not installed"
kubectl version --request-timeout=5s >/dev/null 2>&1 ||
    skip "no reachable Kubernetes cluster (KUBECONFIG=${KUBECONFIG:-~/.kube/config}); see the header of $0 for kind/k3d"
[[ -n "${DOPD_IMAGE:-}" ]] || skip "DOPD_IMAGE is not set (an image with dopd and the test model)"

ns="dopd-e2e-$$"
work="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    helm uninstall "dopd-$$" --namespace "$ns" >/dev/null 2>&1 || true
    kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
command -v helm >/dev/null 2>&1 || skip "helm is not installed (scripts/setup.sh puts it in .bin/)"
kubectl create namespace "$ns"
helm install "dopd-$$" "$root/charts/dopd" --namespace "$ns" --wait --timeout 5m \
    --set image.repository="${DOPD_IMAGE%:*}" --set image.tag="${DOPD_IMAGE##*:}" \
    --set watchNamespace="$ns" --set replicaCount=2 --set headroom.priorityClass.create=false
kubectl -n "$ns" get deploy,pods
local_port=18080

cat <<EOF | kubectl -n "$ns" apply -f -
apiVersion: dopd.dev/v1alpha1
kind: DopdService
metadata: {name: e2e}
spec:
  model: {source: /models/SmolLM2-135M-Instruct.Q4_1.gguf, servedName: smollm2}
  images: {router: "$DOPD_IMAGE", worker: "$DOPD_IMAGE", pullPolicy: IfNotPresent}
  prefill: {minReplicas: 1, maxReplicas: 2, gpusPerInstance: 0}
  decode: {minReplicas: 1, maxReplicas: 2, gpusPerInstance: 0}
  slo: {ttftMs: 5000, tpotMs: 500}
  planner: {gpuBudget: 4, intervalSeconds: 10, scaleDownStabilizationSeconds: 0}
  profile: {preset: smollm2-135m-cpu}
EOF
echo "waiting for the DopdService to run"
for _ in $(seq 1 120); do
    phase=$(kubectl -n "$ns" get dopd e2e -o jsonpath='{.status.phase}' 2>/dev/null || true)
    [[ "$phase" == Running ]] && break
    sleep 5
done
kubectl -n "$ns" get dopd,deploy,pods
[[ "$phase" == Running ]] || { kubectl -n "$ns" logs deploy/"dopd-$$-operator" --tail=50 || true; echo "FAIL: not Running (phase $phase)"; exit 1; }

kubectl -n "$ns" port-forward svc/e2e-router "$local_port:8000" >"$work/pf.log" 2>&1 &
pids+=($!)
sleep 3
curl -fsS "http://127.0.0.1:$local_port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "smollm2", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}'
echo
"$dopd" bench load --url "http://127.0.0.1:$local_port/v1" --trace "$root/traces/AzureLLMInferenceTrace_conv.csv" \
    --duration 60s --rate-scale 0.05 --isl-scale 0.25 --osl-scale 0.1 || true
kubectl -n "$ns" get dopd e2e -o jsonpath='{.status.lastDecision}{"\n"}{.status.history}{"\n"}'
[[ -n "$(kubectl -n "$ns" get dopd e2e -o jsonpath='{.status.lastDecision.reason}')" ]] || { echo "FAIL: no planner decision"; exit 1; }
# The CPU profile wants more prefill than one instance under any load: a count must have moved.
for _ in $(seq 1 36); do
    [[ -n "$(kubectl -n "$ns" get dopd e2e -o jsonpath='{.status.history[0].time}')" ]] && break
    sleep 5
done
[[ -n "$(kubectl -n "$ns" get dopd e2e -o jsonpath='{.status.history[0].time}')" ]] || { echo "FAIL: the planner never scaled"; exit 1; }
kubectl -n "$ns" get dopd e2e
kubectl -n "$ns" get events --field-selector involvedObject.name=e2e
echo "PASS: the operator ran a DopdService on a real cluster"
