#!/usr/bin/env bash
# The real `dopd operator` binary against a real Kubernetes control plane on loopback
# (kube-apiserver, kube-controller-manager, kube-scheduler, etcd and KWOK's fake nodes, built from
# Go modules by e2e/controlplane/), driven with kubectl and helm.
#
#   e2e/operator.sh [path/to/dopd]        (keep=1 keeps the work folder and its logs)
#
# Checks, each against the real component that owns the behaviour:
# - the CRD is established; invalid DopdServices are rejected by the API server's schema and CEL
#   rules with its messages; the examples pass a server-side dry run;
# - the Helm chart installs; the operator runs with the chart's ServiceAccount token, so a
#   missing RBAC rule fails here; two replicas elect a leader through a Lease;
# - the examples reconcile into their children; pods land on the GPU pools their spec selects
#   (spot prefill, on-demand decode, tainted H100 nodes); `kubectl get dopd` shows the printer
#   columns with live values;
# - heavy fake load scales up; the pod that finds no GPU stays Pending (real scheduler) and is
#   reported as CapacityConstrained;
# - headroom placeholders run at the dopd-headroom priority and the scheduler preempts them for
#   real workers; placeholders without room stay Pending for want of a GPU (what an autoscaler
#   scales up for; the cluster-autoscaler itself cannot be built here, see docs/operations.md);
# - idle load drains, then scales down: the worker holding a request is marked safe-to-evict
#   "false" and stays; the ReplicaSet controller removes exactly the drained pods
#   (pod-deletion-cost); the leader is killed mid-drain and the standby finishes it;
# - the workers' PodDisruptionBudgets stop a second eviction;
# - server-side apply: a second field manager is refused a field the operator owns, keeps one it
#   owns itself, and a forced edit of replicas is reverted;
# - /metrics; deletion removes the children through the garbage collector; no reconcile of the
#   whole run failed.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dopd="${1:-$root/target/debug/dopd}"
work="$(mktemp -d)"
export work
export PATH="$root/.bin:$PATH"
pids=()
t0=$(date +%s)
phase_t=$t0
phase() { # prints how long the previous phase took, then the next one's name
    local now
    now=$(date +%s)
    echo "   (took $((now - phase_t)) s)"
    phase_t=$now
    echo "== $*"
}
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -f "$work/cp/pids" ]] && "$root/e2e/controlplane/up.sh" --down "$work/cp"
    wait 2>/dev/null || true
    if [[ "${keep:-}" != 1 ]]; then rm -rf "$work"; else echo "kept $work" >&2; fi
}
trap cleanup EXIT
fail() {
    echo "FAIL: $*" >&2
    # What the cluster held at the failure, for the logs kept below.
    k get dopd,deploy,pods,pdb,events -A -o wide >"$work/cluster.txt" 2>&1 || true
    k get dopd -A -o yaml >"$work/dopd.yaml" 2>&1 || true
    for f in operator-a.log operator-b.log router.log cp/kube-controller-manager.log cp/kube-scheduler.log; do
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
k() { kubectl --cache-dir "$work/cache" --request-timeout=20s "$@"; }
# has TEXT PATTERN: grep on a captured string (no pipes: pipefail and an early-exiting grep clash).
has() { grep -E -- "$2" >/dev/null <<<"$1"; }
export -f k has

echo "== control plane"
"$root/e2e/controlplane/up.sh" "$work/cp" || fail "the control plane did not start"
export KUBECONFIG="$work/cp/kubeconfig"
k version 2>/dev/null | sed 's/^/   /'
wait_for 60 "the default ServiceAccount" k get serviceaccount default

phase "GPU node pools (KWOK): L4 (untainted), H100 spot and on-demand (tainted)"
node() { # NAME GPUS PRODUCT CAPACITY-TYPE TAINTED
    local taint=""
    [[ $5 == yes ]] && taint="taints: [{key: nvidia.com/gpu, value: present, effect: NoSchedule}]"
    cat <<EOF
apiVersion: v1
kind: Node
metadata:
  name: $1
  annotations: {kwok.x-k8s.io/node: fake}
  labels:
    kubernetes.io/hostname: $1
    type: kwok
    nvidia.com/gpu.product: $3
    karpenter.sh/capacity-type: $4
spec:
  $taint
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110", nvidia.com/gpu: "$2"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110", nvidia.com/gpu: "$2"}
---
EOF
}
{
    node cpu-0 0 none on-demand no
    # smollm2 (no placement rules): 4 GPUs, so 4 prefill + 1 decode leaves one pod Pending.
    node l4-0 2 NVIDIA-L4 on-demand no
    node l4-1 2 NVIDIA-L4 on-demand no
    # llama70b: prefill (2 GPUs each) on spot, decode (2 GPUs each) on on-demand.
    node h100-spot-0 8 NVIDIA-H100-80GB-HBM3 spot yes
    node h100-od-0 4 NVIDIA-H100-80GB-HBM3 on-demand yes
} >"$work/nodes.yaml"
k apply -f "$work/nodes.yaml" >/dev/null
wait_for 60 "the nodes to be Ready" bash -c \
    "[[ \$(k get nodes -o jsonpath='{range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\n\"}{end}' | grep -c True) -eq 5 ]]"
k get nodes -L nvidia.com/gpu.product,karpenter.sh/capacity-type | sed 's/^/   /'

phase "CRD and validation by the API server"
k apply -f "$root/crds/dopdservice.yaml"
k wait --for condition=established --timeout=60s crd/dopdservices.dopd.dev >/dev/null
for f in "$root"/examples/invalid/*.yaml; do
    if out=$(k apply -f "$f" 2>&1); then fail "$f was accepted: $out"; fi
    echo "rejected $(basename "$f"): $out"
done
rejects() { # file, expected message
    local out
    out=$(k apply -f "$root/examples/invalid/$1" 2>&1 || true)
    has "$out" "$2" || fail "$1: expected [$2] in: $out"
}
rejects min-above-max.yaml 'spec.decode: Invalid value: .*minReplicas must not exceed maxReplicas'
rejects budget-too-small.yaml 'planner.gpuBudget is smaller than the GPUs the minimum instances need'
rejects negative-slo.yaml 'spec.slo.ttftMs: Invalid value: -5'
k create namespace inference >/dev/null
for f in "$root"/examples/*.yaml; do
    out=$(k apply --dry-run=server -f "$f" 2>&1) || fail "$f: server-side dry run: $out"
    has "$out" "Warning" && fail "$f: the API server warned: $out"
done

phase "the Helm chart installs"
k create namespace dopd-system >/dev/null
helm install dopd "$root/charts/dopd" --namespace dopd-system --set replicaCount=2 \
    --set dashboard.enabled=true --wait=false >"$work/helm.log" 2>&1 ||
    { cat "$work/helm.log"; fail "helm install"; }
[[ $(k -n dopd-system get deployment dopd-operator -o jsonpath='{.spec.replicas}') == 2 ]] || fail "the chart's operator Deployment"
k get priorityclass dopd-headroom >/dev/null || fail "the chart's PriorityClass"
# (KWOK runs no containers: the chart's pods are scheduled and marked Running, the operator
# below is the same binary run as a process, with the chart's ServiceAccount.)
wait_for 60 "the chart's operator pods Running" bash -c \
    "[[ \$(k -n dopd-system get pods -l app.kubernetes.io/name=dopd --field-selector status.phase=Running -o name | wc -l) -eq 2 ]]"
token=$(k -n dopd-system create token dopd-operator --duration 2h)
server=$(k config view --minify -o jsonpath='{.clusters[0].cluster.server}')
cat >"$work/operator.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- {name: e2e, cluster: {server: "$server", certificate-authority: "$work/cp/pki/ca.crt"}}
users:
- {name: dopd-operator, user: {token: "$token"}}
contexts:
- {name: e2e, context: {cluster: e2e, user: dopd-operator, namespace: dopd-system}}
current-context: e2e
EOF

phase "operator (two replicas, leader election, the chart's RBAC) and a fake router"
load() { echo "$2" >"$work/load-$1.json"; } # SERVICE JSON: what its (fake) router sees
python3 "$root/e2e/fake_router.py" --load "$work/load-{name}.json" --port-file "$work/rport" >"$work/router.log" 2>&1 &
pids+=($!)
wait_for 30 "the fake router" test -s "$work/rport"
rport=$(cat "$work/rport")
for id in a b; do
    KUBECONFIG="$work/operator.kubeconfig" "$dopd" operator --router-url "http://127.0.0.1:$rport/{namespace}/{name}" \
        --metrics-listen 127.0.0.1:0 --leader-elect --identity "operator-$id" --lease-namespace dopd-system \
        --log dopd_operator=debug,info >"$work/operator-$id.log" 2>&1 &
    pids+=($!)
    declare "operator_$id=$!"
    wait_for 30 "operator-$id to start" grep -q "metrics, healthz and readyz" "$work/operator-$id.log"
    if [[ $id == a ]]; then wait_for 30 "operator-a to lead" grep -q "leading as operator-a" "$work/operator-a.log"; fi
done
wait_for 30 "operator-b to stand by" grep -q "standing by; operator-a leads" "$work/operator-b.log"
[[ $(k -n dopd-system get lease -o jsonpath='{.items[0].spec.holderIdentity}') == operator-a ]] || fail "the Lease holder"
metrics=$(sed -n 's/.*metrics, healthz and readyz on \(http:[0-9.:/]*\).*/\1/p' "$work/operator-a.log" | sed -n 1p)
curl -fsS "$metrics/healthz" >/dev/null || fail "healthz"
curl -fsS "$metrics/readyz" >/dev/null || fail "readyz"

phase "the examples reconcile into their children, on the pools their spec selects"
# What the llama70b example refers to: its weights' claim (a static volume) and its API key.
cat <<EOF | k apply -f - >/dev/null
apiVersion: v1
kind: PersistentVolume
metadata: {name: llama-weights}
spec:
  capacity: {storage: 200Gi}
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  hostPath: {path: /srv/llama-weights}
  claimRef: {namespace: inference, name: llama-weights}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: llama-weights, namespace: inference}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: llama-weights
  resources: {requests: {storage: 200Gi}}
---
apiVersion: v1
kind: Secret
metadata: {name: llama70b-api-key, namespace: inference}
stringData: {key: e2e}
EOF
for f in "$root"/examples/*.yaml; do k apply -f "$f"; done
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
running() { # NAMESPACE SELECTOR: how many pods are Running
    k -n "$1" get pods -l "$2" --field-selector status.phase=Running -o name | wc -l
}
export -f running
wait_for 60 "llama70b's workers Running" bash -c \
    "[[ \$(running inference dopd.dev/service=llama70b,dopd.dev/role=decode) -eq 2 && \$(running inference dopd.dev/service=llama70b,dopd.dev/role=prefill) -eq 1 ]]"
nodes_of() { k -n "$1" get pods -l "$2" -o jsonpath='{range .items[*]}{.spec.nodeName}{"\n"}{end}' | sort -u | tr '\n' ' '; }
[[ $(nodes_of inference dopd.dev/service=llama70b,dopd.dev/role=prefill) == "h100-spot-0 " ]] || fail "llama70b prefill not on the spot pool"
[[ $(nodes_of inference dopd.dev/service=llama70b,dopd.dev/role=decode) == "h100-od-0 " ]] || fail "llama70b decode not on the on-demand pool"
has "$(nodes_of default dopd.dev/service=smollm2,dopd.dev/role=decode)" '^l4-' || fail "smollm2 decode not on an L4 node"
wait_for 60 "smollm2 Running" bash -c "[[ \$(k get dopd smollm2 -o jsonpath='{.status.phase}') == Running ]]"
table=$(k get dopdservices)
echo "$table"
has "$table" "^NAME +MODEL +PREFILL +DECODE +RATIO +PHASE +AGE" || fail "printer columns"
has "$table" "smollm2 +smollm2 +1/1 +1/1 +1:1 +Running" || fail "live values in the columns"

phase "heavy load scales up; the pod that finds no GPU is reported, not waited for"
k patch dopd smollm2 --type merge -p \
    '{"spec":{"planner":{"intervalSeconds":2,"scaleDownStabilizationSeconds":0,"gpuBudget":8,"pendingTimeoutSeconds":3},"profile":{"preset":"smollm2-135m-cpu"}}}'
# 10 requests of 1500 tokens a second: the CPU profile wants 4 prefill and 1 decode instances.
load smollm2 '{"requests_per_s": 10, "mean_isl": 1500, "mean_osl": 200}'
total() { echo $(($(k get deploy smollm2-prefill -o jsonpath='{.spec.replicas}') + $(k get deploy smollm2-decode -o jsonpath='{.spec.replicas}'))); }
export -f total
wait_for 90 "a scale-up" bash -c "[[ \$(total) -gt 2 ]]"
k get dopdservices
wait_for 30 "the decision history" bash -c "k get dopd smollm2 -o jsonpath='{.status.history}' | grep -q '\"reason\"'"
has "$(k get events.events.k8s.io -o json)" '"reason": *"Scaling"' || fail "Scaling event"
wait_for 30 "the forecast in status" bash -c "k get dopd smollm2 -o jsonpath='{.status.forecast.meanIsl}' | grep -q 1500"
has "$(curl -fsS "http://127.0.0.1:$rport/drained")" '"forecasts": \[[^]]*1500' || fail "the router got no forecast ISL"
# 4 prefill + 1 decode need 5 GPUs; the L4 pool has 4: the scheduler leaves one pod Pending.
cc() { k get dopd smollm2 -o jsonpath='{.status.conditions[?(@.type=="CapacityConstrained")].status}'; }
export -f cc
wait_for 90 "CapacityConstrained" bash -c "[[ \$(cc) == True ]]"
k get dopd smollm2 -o jsonpath='{.status.conditions[?(@.type=="CapacityConstrained")].message}{"\n"}'
has "$(k get events.events.k8s.io -o json)" '"reason": *"CapacityConstrained"' || fail "CapacityConstrained event"
[[ $(k get dopd smollm2 -o jsonpath='{.status.prefill.unschedulable}') -ge 1 ]] || fail "unschedulable count"
pending=$(k get pods -l dopd.dev/service=smollm2 --field-selector status.phase=Pending -o jsonpath='{.items[0].metadata.name}')
[[ -n $pending ]] || fail "no Pending pod"
has "$(k get pod "$pending" -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].message}')" \
    'Insufficient nvidia.com/gpu' || fail "$pending: not Pending for want of a GPU"
has "$(k get events.events.k8s.io --field-selector reason=FailedScheduling -o json)" 'Insufficient nvidia.com/gpu' ||
    fail "no FailedScheduling event from the scheduler"

phase "headroom placeholders run at low priority; the scheduler preempts them for real workers"
# llama70b's spot pool has 8 GPUs, 4 prefill instances. Under a moderate load its forecast's
# upper bound asks for placeholders beyond the target, which take the free GPUs; a heavier load
# then wants more prefill workers than fit beside them.
k -n inference patch dopd llama70b --type merge -p \
    '{"spec":{"planner":{"intervalSeconds":2,"scaleDownStabilizationSeconds":0,"pendingTimeoutSeconds":3}}}'
load llama70b '{"requests_per_s": 4, "mean_isl": 1500, "mean_osl": 200}'
hr() { running inference dopd.dev/service=llama70b,dopd.dev/role=headroom-prefill; }
export -f hr
wait_for 90 "a placeholder Running on the spot pool" bash -c "[[ \$(hr) -ge 1 ]]"
k -n inference get dopd llama70b -o jsonpath='{.status.headroom}{"\n"}'
placeholder=$(k -n inference get pods -l dopd.dev/role=headroom-prefill --field-selector status.phase=Running \
    -o jsonpath='{.items[0].metadata.name}')
[[ $(k -n inference get pod "$placeholder" -o jsonpath='{.spec.priority}') == -10 ]] ||
    fail "placeholder $placeholder: not at the dopd-headroom priority"
before=$(running inference dopd.dev/service=llama70b,dopd.dev/role=prefill)
load llama70b '{"requests_per_s": 12, "mean_isl": 1500, "mean_osl": 200}'
wait_for 120 "the scheduler to preempt a placeholder" bash -c \
    "k -n inference get events.events.k8s.io --field-selector reason=Preempted -o json | grep -q 'headroom-prefill'"
k -n inference get dopd llama70b -o jsonpath='{.status.headroom}{"\n"}'
k -n inference get events.events.k8s.io --field-selector reason=Preempted \
    -o jsonpath='{range .items[*]}{.regarding.name}: {.note}{"\n"}{end}' | sed 's/^/   /'
wait_for 60 "more prefill workers Running" bash -c \
    "[[ \$(running inference dopd.dev/service=llama70b,dopd.dev/role=prefill) -gt $before ]]"
echo "   prefill workers Running: $before -> $(running inference dopd.dev/service=llama70b,dopd.dev/role=prefill)"
# Placeholders the spot pool has no room left for stay Pending, as the scheduler says: that is
# what a cluster-autoscaler adds a node for.
workers=$(k -n inference get deploy llama70b-prefill -o jsonpath='{.spec.replicas}')
placeholders=$(k -n inference get deploy llama70b-headroom-prefill -o jsonpath='{.spec.replicas}')
if ((workers + placeholders > 4)); then
    unplaced() { k -n inference get pods -l dopd.dev/role=headroom-prefill --field-selector status.phase=Pending \
        -o jsonpath='{.items[*].status.conditions[?(@.type=="PodScheduled")].message}'; }
    export -f unplaced
    wait_for 30 "a Pending placeholder the scheduler found no GPU for" bash -c "unplaced | grep -q 'Insufficient nvidia.com/gpu'"
    echo "   $workers workers and $placeholders placeholders for 4 slots: placeholder Pending: $(unplaced | cut -c1-90)"
fi
load llama70b '{"requests_per_s": 0}'

phase "idle load drains, then scales down; the leader is killed in the middle of a drain"
# Each drained worker holds a request for 15 s: the first drain is still running when operator-a
# is killed (SIGKILL, no chance to clean up); operator-b takes the Lease and finishes it.
load smollm2 '{"requests_per_s": 0, "drain_hold_s": 15}'
wait_for 120 "a drain" bash -c "grep -q '50051' <(curl -fsS http://127.0.0.1:$rport/drained)"
held_since=$(date +%s)
ip=$(curl -fsS "http://127.0.0.1:$rport/drained" | grep -oE '[0-9]+(\.[0-9]+){3}:50051' | sed -n 1p)
ip=${ip%:50051}
pod_ips() { k get pods -l dopd.dev/service=smollm2 -o jsonpath='{range .items[*]}{.status.podIP}{"\n"}{end}'; }
busy_marked() { # the pod at $ip carries safe-to-evict: "false" while it holds a request
    k get pods -l dopd.dev/service=smollm2 -o json | python3 -c '
import json, sys
ip = sys.argv[1]
pods = [p for p in json.load(sys.stdin)["items"] if p["status"].get("podIP") == ip]
a = pods[0]["metadata"].get("annotations", {}) if pods else {}
sys.exit(a.get("cluster-autoscaler.kubernetes.io/safe-to-evict") != "false")' "$ip"
}
export -f pod_ips busy_marked
export ip
wait_for 10 "the busy worker marked safe-to-evict: false" busy_marked
{ kill -9 "$operator_a" && wait "$operator_a"; } 2>/dev/null || true
echo "killed the leader (operator-a) while the worker at $ip drains"
# While the drained worker still holds its request, its pod stays (whoever leads).
while (($(date +%s) < held_since + 13)); do
    grep -qx "$ip" <(pod_ips) || fail "the pod at $ip was removed while it held a request"
    sleep 1
done
wait_for 60 "operator-b to lead" grep -q "leading as operator-b" "$work/operator-b.log"
[[ $(k -n dopd-system get lease dopd-operator -o jsonpath='{.spec.holderIdentity}') == operator-b ]] || fail "the Lease holder after the hand-over"
wait_for 180 "a scale-down to 1:1" bash -c "[[ \$(total) -eq 2 ]]"
# Never below the minimum, and nothing scaled twice: it stays at 1:1.
sleep 3
[[ $(total) -eq 2 ]] || fail "scaled below 1:1"
metrics=$(sed -n 's/.*metrics, healthz and readyz on \(http:[0-9.:/]*\).*/\1/p' "$work/operator-b.log" | sed -n 1p)
has "$(k get events.events.k8s.io -o json)" '"reason": *"ScaledDown"' || fail "ScaledDown event"
wait_for 60 "pods to follow" bash -c \
    "[[ \$(k get pods -l 'dopd.dev/service=smollm2,dopd.dev/role in (prefill,decode)' -o name | wc -l) -eq 2 ]]"
# The ReplicaSet controller removed the drained pods (their deletion cost), not the others.
for d in $(curl -fsS "http://127.0.0.1:$rport/drained" | grep -oE '[0-9]+(\.[0-9]+){3}:50051' | sort -u); do
    ! grep -qx "${d%:50051}" <(pod_ips) || fail "the drained worker at $d is still there; another pod was removed"
done

phase "the workers' PodDisruptionBudgets hold"
wait_for 60 "llama70b decode's budget to allow one disruption" bash -c \
    "[[ \$(k -n inference get pdb llama70b-decode -o jsonpath='{.status.disruptionsAllowed}') == 1 ]]"
evict() { # POD: asks the eviction API, prints the HTTP answer
    k create --raw "/api/v1/namespaces/inference/pods/$1/eviction" -f - 2>&1 <<EV
{"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": "$1", "namespace": "inference"}}
EV
}
# As a node drain does (kubectl drain, the cluster-autoscaler): cordon, then evict each pod. The
# replacement of the first has nowhere to go, so the budget has no disruption left for the second.
k cordon h100-od-0 >/dev/null
mapfile -t decode_pods < <(k -n inference get pods -l dopd.dev/service=llama70b,dopd.dev/role=decode \
    --field-selector status.phase=Running -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
out=$(evict "${decode_pods[0]}") || fail "the first eviction was refused: $out"
if out=$(evict "${decode_pods[1]}"); then fail "the second eviction went through the budget: $out"; fi
echo "   second eviction: $out"
has "$out" "disruption budget" || fail "the refusal does not name the budget: $out"
k uncordon h100-od-0 >/dev/null
wait_for 60 "decode back at 2" bash -c \
    "[[ \$(running inference dopd.dev/service=llama70b,dopd.dev/role=decode) -eq 2 ]]"

phase "server-side apply: the operator's fields and another manager's"
ssa() { # MANAGER BODY [flags]: applies a partial smollm2-decode Deployment as MANAGER
    local m=$1 body=$2
    shift 2
    k apply --server-side --field-manager "$m" "$@" -f - 2>&1 <<SSA
apiVersion: apps/v1
kind: Deployment
metadata: {name: smollm2-decode, namespace: default$body
SSA
}
if out=$(ssa team-x '}
spec: {replicas: 3}'); then fail "a second manager took replicas without a conflict: $out"; fi
echo "   ${out%%$'\n'*}"
has "$out" 'conflict with "dopd-operator"' || fail "the conflict does not name the operator: $out"
out=$(ssa team-x ', labels: {team: x}}') || fail "a field the operator does not own was refused: $out"
k patch dopd smollm2 --type merge -p '{"metadata":{"annotations":{"e2e/touch":"1"}}}' >/dev/null
sleep 5
[[ $(k get deploy smollm2-decode -o jsonpath='{.metadata.labels.team}') == x ]] ||
    fail "the operator's apply removed another manager's label"
out=$(ssa team-x '}
spec: {replicas: 4}' --force-conflicts) || fail "a forced apply failed: $out"
wait_for 30 "the forced edit reverted" bash -c "[[ \$(k get deploy smollm2-decode -o jsonpath='{.spec.replicas}') -eq 1 ]]"
has "$(k get deploy smollm2-decode --show-managed-fields -o json)" '"manager": "dopd-operator"' || fail "managedFields"
k patch deployment smollm2-decode --type merge -p '{"spec":{"replicas":5}}'
wait_for 30 "the patched edit reverted" bash -c "[[ \$(k get deploy smollm2-decode -o jsonpath='{.spec.replicas}') -eq 1 ]]"
has "$(k get events.events.k8s.io -o json)" '"reason": *"ReplicasReverted"' || fail "ReplicasReverted event"

phase "metrics"
m=$(curl -fsS "$metrics/metrics")
has "$m" '^dopd_operator_reconciles_total\{result="ok"\}' || fail "reconcile metric"
has "$m" '^dopd_operator_planner_decisions_total\{.*service="smollm2"' || fail "decision metric"
has "$m" '^dopd_operator_predicted_load\{.*quantity="mean_isl"' || fail "forecast metric"
has "$m" '^dopd_operator_leader 1' || fail "leader metric"

phase "deletion: the finalizer, then the garbage collector"
k delete dopd smollm2 --wait=false
wait_for 60 "the DopdService gone" bash -c "! k get dopd smollm2"
wait_for 60 "children removed" bash -c "! k get deploy smollm2-decode && ! k get svc smollm2-router"
wait_for 60 "their pods removed" bash -c "[[ -z \$(k get pods -l dopd.dev/service=smollm2 -o name) ]]"
# Against a real API server every reconcile of the run succeeded (a stale informer copy, a
# deleted object, a second field manager are all normal there, not failures).
failed=$(grep -h "reconcile failed" "$work"/operator-*.log || true)
[[ -z $failed ]] || fail "reconciles failed: $failed"
phase "done"
echo "PASS: operator against a real control plane in $(($(date +%s) - t0)) s"
