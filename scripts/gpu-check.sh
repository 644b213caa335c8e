#!/usr/bin/env bash
# GPU check of the worker: SmolLM2 on CUDA (burn-cuda) against the CPU backend, and decode
# throughput at batch 1, 8 and 32.
#
#   ./scripts/gpu-check.sh build     # here (no GPU needed): stripped release binary with
#                                    # --features cuda into dist/gpu-check/ (about 30 MB)
#   ./scripts/gpu-check.sh run       # on a machine with an NVIDIA GPU and driver, from the repo
#                                    # root, with dist/gpu-check/ copied along
#
# `run` prints the largest logit difference between the CUDA and CPU backends on a fixed
# 64-token prompt and the engine's prefill/decode tokens/s; it fails when no GPU is visible or
# the logits differ by more than TOL (default 1e-2: f32 on both sides, different kernels).
# The real model is used when models/ holds it; otherwise (a device machine whose copy limit the
# 98 MB model file exceeds) seeded random weights of SmolLM2-135M's exact shape, which exercise
# the same kernels and give the same throughput.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=dist/gpu-check
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
TOL=${TOL:-1e-2}

case "${1:-}" in
build)
    CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo build --release --locked -p dopd --features cuda --target-dir target/gpu-check
    mkdir -p "$OUT"
    cp target/gpu-check/release/dopd "$OUT/dopd"
    echo "built $OUT/dopd ($(du -h "$OUT/dopd" | cut -f1)); copy $OUT to the GPU machine"
    ;;
run)
    BIN=$OUT/dopd
    [ -x "$BIN" ] || { echo "gpu-check: $BIN missing: run '$0 build' first" >&2; exit 2; }
    if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L; then
        echo "gpu-check: no NVIDIA GPU visible (nvidia-smi)" >&2
        exit 2
    fi
    if [ -f "$MODEL" ]; then SRC=(--model "$MODEL"); else SRC=(--random-smollm2); fi
    "$BIN" bench worker "${SRC[@]}" --device cuda --check-logits --json | tee "$OUT/gpu-bench.json"
    "$BIN" bench worker "${SRC[@]}" --device cpu --batches 1,8 --json > "$OUT/cpu-bench.json"
    python3 - "$OUT/gpu-bench.json" "$OUT/cpu-bench.json" "$TOL" <<'PY'
import json, sys
gpu, cpu, tol = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), float(sys.argv[3])
diff = gpu["max_logit_diff_vs_cpu"]
print(f"largest logit difference CUDA vs CPU: {diff:.3e} (tolerance {tol:g})")
for r in gpu["rows"]:
    print(f"cuda batch {r['batch']:>3}: prefill {r['prefill_tokens_per_s']:9.1f} tok/s, "
          f"decode {r['decode_tokens_per_s']:8.1f} tok/s")
for r in cpu["rows"]:
    print(f"cpu  batch {r['batch']:>3}: prefill {r['prefill_tokens_per_s']:9.1f} tok/s, "
          f"decode {r['decode_tokens_per_s']:8.1f} tok/s")
sys.exit(0 if diff <= tol else 1)
PY
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
