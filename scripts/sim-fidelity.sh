#!/usr/bin/env bash
# Simulator fidelity: the same scaled-down Azure trace replayed through the real local system
# (`dopd up`, 1 prefill + 1 decode CPU worker) and through `dopd sim` with a profile measured on
# those workers; prints TTFT/TPOT p50/p90 of both and the simulator's error.
#   scripts/sim-fidelity.sh [requests] [isl-scale] [osl-scale] [rate-scale]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-40}; ISL=${2:-0.1}; OSL=${3:-0.25}; RATE=${4:-0.5}
BIN=target/release/dopd
[ -x "$BIN" ] || cargo build --release -p dopd
OUT=${OUT:-target/sim-fidelity}
mkdir -p "$OUT"
python3 - "$N" "$ISL" "$OSL" "$RATE" "$OUT/trace.csv" <<'PY'
import csv, sys, datetime as dt
n, isl, osl, rate, out = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
rows = list(csv.reader(open("traces/AzureLLMInferenceTrace_conv.csv")))[1:n + 1]
parse = lambda s: dt.datetime.strptime(s[:26], "%Y-%m-%d %H:%M:%S.%f")
t0 = parse(rows[0][0])
with open(out, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens"])
    for r in rows:
        t = t0 + (parse(r[0]) - t0) / rate
        w.writerow([t.strftime("%Y-%m-%d %H:%M:%S.%f") + "0", max(1, round(int(r[1]) * isl)), max(1, round(int(r[2]) * osl))])
PY
PORT=18080
"$BIN" up --listen 127.0.0.1:$PORT --no-planner --kv-blocks 512 >"$OUT/up.log" 2>&1 &
PID=$!
trap 'kill -INT $PID 2>/dev/null || true; wait $PID 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break; sleep 0.2; done
URL=http://127.0.0.1:$PORT/v1
echo "== measuring a profile of the local workers"
"$BIN" profile measure --url "$URL" --out "$OUT/profile.yaml" --name local-cpu \
  --isl 8,32,64,128,256 --concurrency 1,2,4,8 --context 32,128,256 --reps 2 --decode-tokens 16
echo "== replaying $N requests through dopd up"
"$BIN" bench load --url "$URL" --trace "$OUT/trace.csv" --ttft-slo 2s --tpot-slo 200ms \
  --records "$OUT/real.csv" --json >"$OUT/real.json"
echo "== replaying the same trace in dopd sim"
"$BIN" sim run --trace "$OUT/trace.csv" --profile "$OUT/profile.yaml" --policy static:1x1 \
  --budget 2 --slo-ttft 2 --slo-tpot 0.2 --kv-link-gbps 0.5 --json >"$OUT/sim.json"
python3 - "$OUT/real.json" "$OUT/sim.json" <<'PY'
import json, sys
real = json.load(open(sys.argv[1])); sim = json.load(open(sys.argv[2]))["summary"]
print(f"{'metric':<10} {'dopd up':>10} {'dopd sim':>10} {'error':>8}")
for k in ["ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"]:
    r, s = real[k + "_s"], sim[k + "_s"]
    print(f"{k:<10} {r * 1e3:>8.0f}ms {s * 1e3:>8.0f}ms {100 * (s - r) / r:>+7.0f}%")
print(f"requests: real {real['requests']} ({real['ok']} ok), sim {sim['requests']}")
PY
