#!/usr/bin/env bash
# GPU check of the worker: SmolLM2 on CUDA (burn-cuda) against the CPU backend, decode
# throughput at batch 1, 8, 32 and 128, prefill of a 2048-token prompt, and the fraction of the
# GPU's memory bandwidth decode uses (bytes of weights + K/V a step reads / step time / PEAK_GBPS,
# default 4800: an H200's HBM3e; set it for another GPU).
#
#   ./scripts/gpu-check.sh build     # here (no GPU needed): stripped release binary with
#                                    # --features cuda into dist/gpu-check/ (about 30 MB)
#   ./scripts/gpu-check.sh run       # on a machine with an NVIDIA GPU and driver, from the repo
#                                    # root, with dist/gpu-check/ copied along
#
# `run` compares the CUDA backend with the CPU backend on a fixed 64-token prompt (largest logit
# difference relative to the logit scale, arg-max agreement, and the engine's greedy tokens
# through cached prefill and batched decode), once for the full depth and once for one layer
# (to tell rounding that grows with depth from a wrong kernel), and prints the engine's
# prefill/decode tokens/s. It fails when no GPU is visible, the relative difference exceeds TOL
# (default 1e-2: f32 on both sides, different kernels) or fewer than 95% of arg-maxes agree.
# The real model is used when models/ holds it; otherwise (a device machine whose copy limit the
# 98 MB model file exceeds) seeded random weights of SmolLM2-135M's exact shape, which exercise
# the same kernels and give the same throughput.
# CUDA libraries: the driver's libcuda and an NVRTC are found on the usual paths (a CUDA
# toolkit, or the NVIDIA pip wheels); stub libraries are skipped. Where the machine's python3
# has torch and transformers, the peer (scripts/gpu-peer-transformers.py: transformers'
# LlamaForCausalLM of the same shape) runs in the same call and prints its tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=dist/gpu-check
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
TOL=${TOL:-1e-2}
PEAK_GBPS=${PEAK_GBPS:-4800}

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
    libs=$(find /usr /opt -name 'libnvrtc.so*' 2>/dev/null | grep -v stubs | xargs -r -n1 dirname |
        sort -u | tr '\n' ':')
    export LD_LIBRARY_PATH=/usr/local/nvidia/lib64:$libs${LD_LIBRARY_PATH:-}
    if [ -f "$MODEL" ]; then SRC=(--model "$MODEL"); else SRC=(--random-smollm2); fi
    "$BIN" bench worker "${SRC[@]}" --device cuda --check-logits --batches 1,8,32,128 --json |
        tee "$OUT/gpu-bench.json"
    "$BIN" bench worker "${SRC[@]}" --device cuda --batches 1 --prompt-len 2048 --decode-tokens 16 \
        --json > "$OUT/gpu-prefill-2048.json"
    "$BIN" bench worker --random-smollm2 --layers 1 --device cuda --check-logits --batches 1 \
        --json > "$OUT/gpu-one-layer.json"
    "$BIN" bench worker "${SRC[@]}" --device cpu --batches 1,8 --json > "$OUT/cpu-bench.json"
    # The same decode with burn's tensor operations instead of the fused kernels (A/B).
    "$BIN" bench worker "${SRC[@]}" --device cuda --no-fused-kernels --batches 1,32 --json \
        > "$OUT/gpu-bench-unfused.json" || echo "gpu-check: the unfused run failed" >&2
    # The peer in the same run, where the machine's python3 has torch and transformers.
    if python3 -c 'import torch, transformers' 2>/dev/null; then
        timeout 300 python3 scripts/gpu-peer-transformers.py 1,8,32,128 "$OUT/peer.json" ||
            echo "gpu-check: the transformers peer failed (its figures are missing)" >&2
    fi
    python3 - "$OUT/gpu-bench.json" "$OUT/cpu-bench.json" "$OUT/gpu-one-layer.json" "$TOL" \
        "$OUT/gpu-prefill-2048.json" "$PEAK_GBPS" <<'PY'
import json, sys
gpu, cpu, one = (json.load(open(f)) for f in sys.argv[1:4])
tol = float(sys.argv[4])
long = json.load(open(sys.argv[5]))
peak = float(sys.argv[6])
ok = True
for name, rep in (("full depth", gpu), ("one layer", one)):
    c = rep["logits_vs_cpu"]
    print(f"{name}: logits CUDA vs CPU differ by at most {c['max_abs_diff']:.3e} of scale "
          f"{c['max_abs_logit']:.3e} (relative {c['rel_diff']:.3e}, tolerance {tol:g}); "
          f"arg-max agrees at {100 * c['top1_agreement']:.1f}% of {c['positions']} positions; "
          f"engine greedy tokens identical for {c['greedy_same_prefix']} of {c['greedy_tokens']}")
    ok = ok and c["rel_diff"] <= tol and c["top1_agreement"] >= 0.95
for r in gpu["rows"]:
    print(f"cuda batch {r['batch']:>3}: prefill {r['prefill_tokens_per_s']:9.1f} tok/s, "
          f"decode {r['decode_tokens_per_s']:8.1f} tok/s, step {1e3 * r['decode_step_s']:.2f} ms, "
          f"reads {r['decode_read_gb_per_s']:.0f} GB/s = {100 * r['decode_read_gb_per_s'] / peak:.1f}% "
          f"of {peak:g} GB/s")
for r in long["rows"]:
    print(f"cuda prefill of a {r['prompt_len']}-token prompt: {r['prefill_tokens_per_s']:.1f} tok/s")
for r in cpu["rows"]:
    print(f"cpu  batch {r['batch']:>3}: prefill {r['prefill_tokens_per_s']:9.1f} tok/s, "
          f"decode {r['decode_tokens_per_s']:8.1f} tok/s")
print(f"fused kernels: {gpu.get('fused_kernels')}")
try:
    unfused = json.load(open(sys.argv[1].replace("gpu-bench.json", "gpu-bench-unfused.json")))
    for r in unfused["rows"]:
        print(f"cuda batch {r['batch']:>3}, tensor operations only: decode "
              f"{r['decode_tokens_per_s']:8.1f} tok/s, step {1e3 * r['decode_step_s']:.2f} ms")
except (OSError, ValueError, KeyError) as e:
    print(f"(no unfused figures: {e})")
sys.exit(0 if ok else 1)
PY
    ;;
*)
    echo "usage: $0 build|run" >&2
    exit 2
    ;;
esac
