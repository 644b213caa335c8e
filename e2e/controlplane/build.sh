#!/usr/bin/env bash
# Builds the real Kubernetes control plane for the e2e tier from Go modules (go.mod here pins
# them): kube-apiserver, kube-controller-manager, kube-scheduler (k8s.io/kubernetes, with a
# replace line per staging module as Kubernetes requires), etcd (go.etcd.io/etcd/server/v3, whose
# root package is etcd's main) and KWOK's controller (sigs.k8s.io/kwok/cmd/kwok, fake nodes).
# The binaries go to a cache outside the repository keyed by go.mod and go.sum, so a machine
# builds them once; the script prints that folder. Progress goes to stderr.
#
#   e2e/controlplane/build.sh            -> ~/.cache/dopd/controlplane/KEY/bin
set -euo pipefail
cd "$(dirname "$0")"
command -v go >/dev/null || { echo "controlplane: go is missing" >&2; exit 1; }
key=$(cat go.mod go.sum | sha256sum | cut -c1-12)
out=${DOPD_CACHE:-$HOME/.cache/dopd}/controlplane/$key
bins="kube-apiserver kube-controller-manager kube-scheduler etcd kwok"
missing=0
for b in $bins; do [ -x "$out/bin/$b" ] || missing=1; done
if [ $missing = 0 ]; then
  echo "controlplane: cached in $out/bin" >&2
  echo "$out/bin"
  exit 0
fi
k8s=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
major=${k8s#v}; major=${major%%.*}
minor=${k8s#v*.}; minor=${minor%%.*}
# The version the servers report (hack/lib/version.sh stamps the same variables).
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$k8s -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
done
export CGO_ENABLED=0
tmp=$out/bin.part
rm -rf "$tmp" && mkdir -p "$tmp"
t0=$(date +%s)
echo "controlplane: go mod download (Kubernetes $k8s)" >&2
go mod download
for main in k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
            k8s.io/kubernetes/cmd/kube-scheduler sigs.k8s.io/kwok/cmd/kwok; do
  echo "controlplane: building ${main##*/} ($(( $(date +%s) - t0 )) s)" >&2
  go build -trimpath -ldflags "$ldflags" -o "$tmp/" "$main"
done
echo "controlplane: building etcd ($(( $(date +%s) - t0 )) s)" >&2
go build -trimpath -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
rm -rf "$out/bin" && mv "$tmp" "$out/bin"
echo "controlplane: built in $(( $(date +%s) - t0 )) s into $out/bin" >&2
for b in $bins; do
  printf 'controlplane: %-24s %s\n' "$b" "$("$out/bin/$b" --version 2>&1 | head -1)" >&2
done
echo "$out/bin"
