#!/usr/bin/env bash
# The GPU build (--features dopd/cuda,dopd-worker/wgpu) must not change the features of a crate
# the plain build also compiles, other than burn's and ours: each such change compiles that crate
# and everything above it a second time (serde's `rc` once cost 183 crates and 13 minutes of CI).
# worker/Cargo.toml and proto/Cargo.toml turn those features on in every build; this says when a
# dependency update adds one they do not cover. Only reads `cargo tree`; takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
tree() { cargo tree --workspace --locked -e normal,build,dev -f '{p} [{f}]' --prefix none "$@"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tree >"$tmp/plain"
tree --features dopd/cuda,dopd-worker/wgpu >"$tmp/gpu"
python3 - "$tmp/plain" "$tmp/gpu" <<'PY'
import re, sys
# Crates whose features the GPU features are meant to change.
EXPECTED = {"burn", "burn-backend", "burn-std", "dopd", "dopd-worker"}
def load(path):
    sets = {}
    for line in open(path):
        m = re.match(r"(\S+) (v\S+)(?: \(.*?\))?(?: \(\*\))? \[(.*)\]", line.strip())
        if m:
            feats = frozenset(f for f in m.group(3).split(",") if f)
            sets.setdefault((m.group(1), m.group(2)), set()).add(feats)
    return sets
plain, gpu = load(sys.argv[1]), load(sys.argv[2])
bad = [(k, plain[k], gpu[k]) for k in sorted(plain)
       if k in gpu and k[0] not in EXPECTED and not plain[k] <= gpu[k]]
for (name, ver), p, g in bad:
    extra = sorted(set().union(*g) - set().union(*p))
    print(f"gpu-features: {name} {ver}: the GPU features add {extra}; turn them on in "
          "worker/Cargo.toml (or proto/Cargo.toml's build-dependencies for build-time crates)")
if bad:
    sys.exit(1)
print(f"gpu-features: ok ({len(plain)} crates of the plain build keep their features)")
PY
