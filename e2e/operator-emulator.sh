#!/usr/bin/env bash
# Process-level operator test: the real `dopd operator` binary against the Kubernetes API emulator
# (kmock + e2e/emulator/kube_emulator.py) on loopback, driven with kubectl.
#
#   e2e/operator-emulator.sh [path/to/dopd]
#
# Checks: the CRD applies; invalid DopdServices are rejected by the schema with clear messages;
# examples/*.yaml reconcile into their children; `kubectl get dopdservices` shows the printer
# columns with live values; a second operator replica stands by on the Lease; heavy fake load
# scales up and idle load drains then scales down (status, history, Events), and the leader killed
# during that drain is replaced by the standby, which finishes it; a manual replica edit
# is reverted with an Event; /metrics counts reconciles and decisions; deletion removes children.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dopd="${1:-$root/target/debug/dopd}"
work="$(mktemp -d)"
export work
export PATH="$root/.bin:$PATH"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    if [[ "${keep:-}" != 1 ]]; then rm -rf "$work"; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    for f in emulator.log operator-a.log operator-b.log router.log; do
        echo "--- $f (tail)" >&2
        tail -n 30 "$work/$f" >&2 || true
    done
    keep=1
    exit 1
}
wait_for() { # seconds, description, command...
    local t=$1 what=$2
    shift 2
    for _ in $(seq 1 $((t * 2))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    fail "timed out after ${t}s waiting for: $what"
}

# 10 GPUs: both examples at their minimums use 8 (llama70b 1x2 + 2x2, smollm2 1 + 1).
python3 "$root/e2e/emulator/kube_emulator.py" --gpus-free 10 --port-file "$work/port" >"$work/emulator.log" 2>&1 &
pids+=($!)
wait_for 60 "the emulator to listen" test -s "$work/port"
port=$(cat "$work/port")
cat >"$work/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- cluster: {server: "http://127.0.0.1:$port"}
  name: emulator
contexts:
- context: {cluster: emulator, user: emulator, namespace: default}
  name: emulator
current-context: emulator
users:
- name: emulator
  user: {token: emulator}
EOF
export KUBECONFIG="$work/kubeconfig"
k() { kubectl --cache-dir "$work/cache" --request-timeout=10s "$@"; }
# has TEXT PATTERN: grep on a captured string (no pipes: pipefail and an early-exiting grep clash).
has() { grep -E -- "$2" >/dev/null <<<"$1"; }

echo "== CRD and schema validation"
k apply --validate=false -f "$root/crds/dopdservice.yaml"
for f in "$root"/examples/invalid/*.yaml; do
    if out=$(k apply --validate=false -f "$f" 2>&1); then fail "$f was accepted: $out"; fi
    echo "rejected $(basename "$f"): $out"
done
rejects() { # file, expected message
    local out
    out=$(k apply --validate=false -f "$root/examples/invalid/$1" 2>&1 || true)
    has "$out" "$2" || fail "$1: expected [$2] in: $out"
}
rejects min-above-max.yaml 'spec.decode: Invalid value: "object": minReplicas must not exceed maxReplicas'
rejects budget-too-small.yaml 'planner.gpuBudget is smaller than the GPUs the minimum instances need'
rejects negative-slo.yaml 'spec.slo.ttftMs: Invalid value: -5'

echo "== the Helm chart applies (dry run, then for real)"
helm template dopd "$root/charts/dopd" --namespace dopd-system --include-crds \
    --set replicaCount=2 --set dashboard.enabled=true >"$work/chart.yaml"
k apply --dry-run=client --validate=false -f "$work/chart.yaml" >"$work/dry-run.log" ||
    { cat "$work/dry-run.log"; fail "kubectl apply --dry-run=client of the chart"; }
k apply --validate=false -f "$work/chart.yaml" >/dev/null
[[ $(k -n dopd-system get deployment dopd-operator -o jsonpath='{.spec.replicas}') == 2 ]] || fail "the chart's operator Deployment"
k get clusterrole dopd-operator >/dev/null || fail "the chart's ClusterRole"
k get priorityclass dopd-headroom >/dev/null || fail "the chart's PriorityClass"
# (The emulator runs no containers: the operator below is the same binary, run as a process.)

echo "== operator (two replicas, leader election) and a fake router"
echo '{"requests_per_s": 0}' >"$work/load.json"
python3 "$root/e2e/emulator/fake_router.py" --load "$work/load.json" --port-file "$work/rport" >"$work/router.log" 2>&1 &
pids+=($!)
wait_for 30 "the fake router" test -s "$work/rport"
rport=$(cat "$work/rport")
for id in a b; do
    "$dopd" operator --router-url "http://127.0.0.1:$rport" --metrics-listen 127.0.0.1:0 \
        --leader-elect --identity "operator-$id" --lease-namespace default --log dopd_operator=debug,info \
        >"$work/operator-$id.log" 2>&1 &
    pids+=($!)
    declare "operator_$id=$!"
    wait_for 30 "operator-$id to start" grep -q "metrics, healthz and readyz" "$work/operator-$id.log"
    if [[ $id == a ]]; then wait_for 30 "operator-a to lead" grep -q "leading as operator-a" "$work/operator-a.log"; fi
done
wait_for 30 "operator-b to stand by" grep -q "standing by; operator-a leads" "$work/operator-b.log"
metrics=$(sed -n 's/.*metrics, healthz and readyz on \(http:[0-9.:/]*\).*/\1/p' "$work/operator-a.log" | head -1)
curl -fsS "$metrics/healthz" >/dev/null || fail "healthz"
curl -fsS "$metrics/readyz" >/dev/null || fail "readyz"

echo "== examples reconcile into their children"
for f in "$root"/examples/*.yaml; do k apply --validate=false -f "$f"; done
for d in smollm2-router smollm2-prefill smollm2-decode; do
    wait_for 30 "deployment $d" k get deployment "$d"
done
for d in llama70b-router llama70b-prefill llama70b-decode; do
    wait_for 30 "deployment $d" k -n inference get deployment "$d"
done
for o in service/smollm2-router service/smollm2-prefill service/smollm2-decode configmap/smollm2-config \
    poddisruptionbudget/smollm2-decode serviceaccount/smollm2-router role/smollm2-router rolebinding/smollm2-router; do
    k get "$o" >/dev/null || fail "$o missing"
done
[[ $(k -n inference get deployment llama70b-decode -o jsonpath='{.spec.replicas}') == 2 ]] || fail "llama70b decode min 2"
has "$(k -n inference get deployment llama70b-prefill -o jsonpath='{.spec.template.spec.nodeSelector}')" \
    '"karpenter.sh/capacity-type":"spot"' || fail "spot prefill"
wait_for 60 "smollm2 Running" bash -c "[[ \$(kubectl --cache-dir $work/cache get dopd smollm2 -o jsonpath='{.status.phase}') == Running ]]"
table=$(k get dopdservices)
echo "$table"
has "$table" "^NAME +MODEL +PREFILL +DECODE +RATIO +PHASE +AGE" || fail "printer columns"
has "$table" "smollm2 +smollm2 +1/1 +1/1 +1:1 +Running" || fail "live values in the columns"

echo "== heavy load scales up"
k patch dopd smollm2 --type merge -p \
    '{"spec":{"planner":{"intervalSeconds":2,"scaleDownStabilizationSeconds":0,"gpuBudget":8,"pendingTimeoutSeconds":3},"profile":{"preset":"smollm2-135m-cpu"}}}'
# 10 requests of 1500 tokens a second: the CPU profile wants 4 prefill and 1 decode instances.
echo '{"requests_per_s": 10, "mean_isl": 1500, "mean_osl": 200}' >"$work/load.json"
total() { echo $(($(k get deploy smollm2-prefill -o jsonpath='{.spec.replicas}') + $(k get deploy smollm2-decode -o jsonpath='{.spec.replicas}'))); }
wait_for 90 "a scale-up" bash -c "[[ \$($(declare -f k total); total) -gt 2 ]]"
k get dopdservices
# (The status is written after the scale-up it records: wait for it.)
wait_for 30 "the decision history" bash -c "kubectl --cache-dir $work/cache get dopd smollm2 -o jsonpath='{.status.history}' | grep -q '\"reason\"'"
has "$(k get events.events.k8s.io -o json)" '"reason": *"Scaling"' || fail "Scaling event"
wait_for 30 "the forecast in status" bash -c "kubectl --cache-dir $work/cache get dopd smollm2 -o jsonpath='{.status.forecast.meanIsl}' | grep -q 1500"
has "$(curl -fsS "http://127.0.0.1:$rport/drained")" '"forecasts": \[[^]]*1500' || fail "the router got no forecast ISL"

echo "== pods that find no GPU are reported, not waited for"
# 4 prefill + 1 decode need 5 GPUs; 2 are left: one prefill pod stays Pending.
cc() { kubectl --cache-dir "$work/cache" get dopd smollm2 -o jsonpath='{.status.conditions[?(@.type=="CapacityConstrained")].status}'; }
wait_for 60 "CapacityConstrained" bash -c "[[ \$($(declare -f cc); cc) == True ]]"
k get dopd smollm2 -o jsonpath='{.status.conditions[?(@.type=="CapacityConstrained")].message}{"\n"}'
has "$(k get events.events.k8s.io -o json)" '"reason": *"CapacityConstrained"' || fail "CapacityConstrained event"
[[ $(k get dopd smollm2 -o jsonpath='{.status.prefill.unschedulable}') -ge 1 ]] || fail "unschedulable count"

echo "== idle load drains, then scales down; the leader is killed in the middle of a drain"
# Each drained worker holds a request for 15 s: the first drain is still running when operator-a
# is killed (SIGKILL, no chance to clean up); operator-b takes the Lease and finishes it.
echo '{"requests_per_s": 0, "drain_hold_s": 15}' >"$work/load.json"
wait_for 120 "a drain" bash -c "grep -q '50051' <(curl -fsS http://127.0.0.1:$rport/drained)"
held_since=$(date +%s)
ip=$(curl -fsS "http://127.0.0.1:$rport/drained" | grep -oE '127\.0\.0\.[0-9]+:50051' | head -1)
ip=${ip%:50051}
kill -9 "$operator_a"
echo "killed the leader (operator-a) while the worker at $ip drains"
pod_ips() { kubectl --cache-dir "$work/cache" get pods -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}'; }
# While the drained worker still holds its request, its pod stays (whoever leads).
while (($(date +%s) < held_since + 13)); do
    grep -qx "$ip" <(pod_ips) || fail "the pod at $ip was removed while it held a request"
    sleep 1
done
wait_for 60 "operator-b to lead" grep -q "leading as operator-b" "$work/operator-b.log"
wait_for 180 "a scale-down to 1:1" bash -c "[[ \$($(declare -f k total); total) -eq 2 ]]"
# Never below the minimum, and nothing scaled twice: it stays at 1:1.
sleep 3
[[ $(total) -eq 2 ]] || fail "scaled below 1:1"
metrics=$(sed -n 's/.*metrics, healthz and readyz on \(http:[0-9.:/]*\).*/\1/p' "$work/operator-b.log" | head -1)
has "$(curl -fsS "http://127.0.0.1:$rport/drained")" '"http://127\.0\.0\.[0-9]+:50051"' || fail "the router was not asked to drain"
has "$(k get events.events.k8s.io -o json)" '"reason": *"ScaledDown"' || fail "ScaledDown event"
wait_for 30 "pods to follow" bash -c "[[ \$(kubectl --cache-dir $work/cache get pods -l dopd.dev/service=smollm2,dopd.dev/role=decode -o name | wc -l) -eq 1 ]]"

echo "== a manual replica edit is reverted"
k patch deployment smollm2-decode --type merge -p '{"spec":{"replicas":5}}'
wait_for 30 "the revert" bash -c "[[ \$(kubectl --cache-dir $work/cache get deploy smollm2-decode -o jsonpath='{.spec.replicas}') -eq 1 ]]"
has "$(k get events.events.k8s.io -o json)" '"reason": *"ReplicasReverted"' || fail "ReplicasReverted event"

echo "== metrics"
m=$(curl -fsS "$metrics/metrics")
has "$m" '^dopd_operator_reconciles_total\{result="ok"\}' || fail "reconcile metric"
has "$m" '^dopd_operator_planner_decisions_total\{.*service="smollm2"' || fail "decision metric"
has "$m" '^dopd_operator_predicted_load\{.*quantity="mean_isl"' || fail "forecast metric"
has "$m" '^dopd_operator_leader 1' || fail "leader metric"

echo "== deletion"
k delete dopd smollm2 --wait=false
wait_for 30 "children removed" bash -c "! kubectl --cache-dir $work/cache get deploy smollm2-decode"
wait_for 30 "the DopdService gone" bash -c "! kubectl --cache-dir $work/cache get dopd smollm2"
echo "PASS: operator against the Kubernetes API emulator"
