#!/usr/bin/env bash
# Kernels a decode step launches and compiles on CubeCL (burn-wgpu), the measure of a small
# model's GPU step time that a machine without a GPU can take (worker/examples/kernel_count.rs).
# Needs a Vulkan device; without a GPU, Mesa's software one: apt-get install mesa-vulkan-drivers.
#
#   scripts/kernel-count.sh [STEPS]     # default 40 decode steps at batch 2, then batch 3..8
#
# Prints, for a 1-layer and a 2-layer model: kernels launched per decode step (median of the
# steps at batch 2 after the first), hence per layer and outside the layers; and, after the
# model's warm-up (as `dopd worker` runs it on a GPU), the kernels compiled while decoding at
# batch 2 and then at batches 3 to 40 (a compile stalls a step by far more than a launch).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-40}
cargo build --release -q -p dopd-worker --features wgpu --example kernel_count
EX=target/release/examples/kernel_count
declare -A per_step
for layers in 1 2; do
    log=$(mktemp)
    CUBECL_DEBUG_OPTION=profile-full CUBECL_DEBUG_LOG=stderr "$EX" "$layers" "$STEPS" warm \
        2> "$log" >/dev/null
    per_step[$layers]=$(awk -v steps="$STEPS" '
        /^=== STEP/ { s = $3; b = $5; n = 0; inside = 1; next }
        /^=== END/  { inside = 0; if (s > 0 && s < steps) print n; next }
        inside && /^\| [0-9.]+(µs|ms|ns|s) / { n++ }' "$log" | sort -n |
        awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')
    compiles=$(awk '
        /^=== WARMED/ { warm = 1; next }
        /^=== STEP/ { s = $3; b = $5; next }
        /START_KERNEL_COMPILATION/ { if (warm) c[s " (batch " b ")"]++ }
        END { for (k in c) printf "step %s: %d; ", k, c[k] }' "$log")
    echo "layers $layers: ${per_step[$layers]} kernels per decode step at batch 2;" \
        "compiles after the warm-up: ${compiles:-none}"
    rm -f "$log"
done
echo "per layer: $(( per_step[2] - per_step[1] )) kernels; outside the layers:" \
    "$(( 2 * per_step[1] - per_step[2] ))"
