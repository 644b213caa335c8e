#!/usr/bin/env bash
# Brings a real Kubernetes control plane up on loopback, the way envtest does, from the binaries
# build.sh makes: etcd, kube-apiserver (its own CA, a serving certificate for 127.0.0.1, an admin
# client certificate in system:masters, a service-account signing key), kube-controller-manager,
# kube-scheduler and KWOK (which runs the nodes annotated kwok.x-k8s.io/node=fake).
#
#   e2e/controlplane/up.sh DIR      starts it; writes DIR/kubeconfig and DIR/pids, logs in DIR/*.log
#   e2e/controlplane/up.sh --down DIR
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" = --down ]; then
  d=$2
  [ -f "$d/pids" ] && while read -r pid name; do kill "$pid" 2>/dev/null || true; done <"$d/pids"
  sleep 1
  [ -f "$d/pids" ] && while read -r pid name; do kill -9 "$pid" 2>/dev/null || true; done <"$d/pids"
  rm -f "$d/pids"
  exit 0
fi
d=$(mkdir -p "$1" && cd "$1" && pwd)
bin=$("$here/build.sh")
command -v openssl >/dev/null || { echo "controlplane: openssl is missing" >&2; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
t0=$(date +%s.%N)
since() { python3 -c "import time; print(f'{time.time()-$t0:.1f} s')"; }

pki=$d/pki
mkdir -p "$pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=dopd-e2e-ca \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
cert() { # NAME SUBJECT [SAN]
  openssl req -new -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
  if [ -n "${3:-}" ]; then printf 'subjectAltName=%s\n' "$3" >"$pki/$1.ext"; else : >"$pki/$1.ext"; fi
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
}
cert apiserver /CN=kube-apiserver "IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default.svc"
cert admin "/O=system:masters/CN=admin"
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null

: >"$d/pids"
start() { # NAME ARGS...
  local name=$1; shift
  "$@" >"$d/$name.log" 2>&1 &
  echo "$! $name" >>"$d/pids"
}
etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
start etcd "$bin/etcd" --data-dir "$d/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --unsafe-no-fsync --log-level warn
start kube-apiserver "$bin/kube-apiserver" --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --endpoint-reconciler-type none \
  --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --authorization-mode Node,RBAC \
  --service-cluster-ip-range 10.0.0.0/24 --allow-privileged=true \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key"

cat >"$d/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster: {server: "https://127.0.0.1:$api_port", certificate-authority: "$pki/ca.crt"}
users:
- name: admin
  user: {client-certificate: "$pki/admin.crt", client-key: "$pki/admin.key"}
contexts:
- name: e2e
  context: {cluster: e2e, user: admin}
current-context: e2e
KC
for _ in $(seq 1 300); do
  curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1 && break
  sleep 0.2
done
curl -sf --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
  "https://127.0.0.1:$api_port/readyz" >/dev/null \
  || { tail -20 "$d/kube-apiserver.log" "$d/etcd.log"; echo "controlplane: kube-apiserver never ready" >&2; exit 1; }
echo "controlplane: etcd and kube-apiserver ready ($(since))" >&2
# KWOK renews the fake nodes' Leases; on a loaded 2-core CI machine a renewal can come later than the
# default grace period, the node controller then marks every pod NotReady (KWOK's pod-ready stage does
# not set them back), and a PodDisruptionBudget allows no disruption for the rest of the run. Node
# health is not under test here, so the grace period is long.
start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$d/kubeconfig" \
  --leader-elect=false --secure-port 0 --service-account-private-key-file "$pki/sa.key" \
  --root-ca-file "$pki/ca.crt" --use-service-account-credentials \
  --service-cluster-ip-range 10.0.0.0/24 --controllers '*' --node-monitor-grace-period 10m
start kube-scheduler "$bin/kube-scheduler" --kubeconfig "$d/kubeconfig" --leader-elect=false \
  --secure-port 0
kwok_dir=$(cd "$here" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)
for f in node/fast/node-initialize node/heartbeat-with-lease/node-heartbeat-with-lease \
         pod/fast/pod-ready pod/fast/pod-complete pod/fast/pod-delete; do
  cat "$kwok_dir/kustomize/stage/$f.yaml"; echo "---"
done >"$d/kwok.yaml"
start kwok "$bin/kwok" --kubeconfig "$d/kubeconfig" --manage-all-nodes=false \
  --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake -c "$d/kwok.yaml"
echo "controlplane: up in $(since): KUBECONFIG=$d/kubeconfig" >&2
