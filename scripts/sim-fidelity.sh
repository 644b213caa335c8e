#!/usr/bin/env bash
# Simulator fidelity: the same scaled-down Azure trace replayed through the real local system
# (`dopd up`) and through `dopd sim` with a profile measured on those workers, twice:
#   1. planner off: 1 prefill + 1 decode CPU worker, against `dopd sim --policy dopd-static:1x1`
#      (the same length-aware routing, with the router's ultra-short threshold of 32 tokens);
#   2. planner on: `dopd up` with its control loop, against `dopd sim --policy dopd` with the same
#      worker budget (the same control loop runs in both).
# Prints TTFT/TPOT p50/p90 of each pair with the simulator's error, and the targets over time.
#   scripts/sim-fidelity.sh [requests] [isl-scale] [osl-scale] [rate-scale]
# BUDGET=N sets the planner-on worker budget (default: dopd up's default for this machine).
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
URL=http://127.0.0.1:$PORT/v1
PID=
stop_up() { if [ -n "$PID" ]; then kill -INT "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; PID=; fi; }
trap stop_up EXIT
start_up() { # log, extra args...
  local log=$1; shift
  "$BIN" up --listen 127.0.0.1:$PORT --kv-blocks 512 "$@" >"$log" 2>&1 &
  PID=$!
  for _ in $(seq 1 300); do curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && return 0; sleep 0.2; done
  cat "$log"; echo "dopd up did not come up" >&2; exit 1
}
replay() { # name
  "$BIN" bench load --url "$URL" --trace "$OUT/trace.csv" --ttft-slo 2s --tpot-slo 200ms \
    --records "$OUT/real-$1.csv" --json >"$OUT/real-$1.json"
}

echo "== planner off: measuring a profile of the local workers"
start_up "$OUT/up-static.log" --no-planner
"$BIN" profile measure --url "$URL" --out "$OUT/profile.yaml" --name local-cpu \
  --isl 8,32,64,128,256 --concurrency 1,2,4,8 --context 32,128,256 --reps 2 --decode-tokens 16
echo "== planner off: replaying $N requests through dopd up"
replay static
stop_up
"$BIN" sim run --trace "$OUT/trace.csv" --profile "$OUT/profile.yaml" --policy dopd-static:1x1 \
  --budget 2 --slo-ttft 2 --slo-tpot 0.2 --kv-link-gbps 0.5 --ultra-short-max-isl 32 \
  --json >"$OUT/sim-static.json"

echo "== planner on: replaying $N requests through dopd up"
# The planner of dopd up plans with the measured profile too, as the simulator does.
start_up "$OUT/up-dopd.log" --profile "$OUT/profile.yaml" ${BUDGET:+--max-workers "$BUDGET"}
budget=$(sed -n 's/.*(budget \([0-9]*\) workers).*/\1/p' "$OUT/up-dopd.log" | head -1)
replay dopd
sleep 11 # one more tick after the last request
stop_up
"$BIN" sim run --trace "$OUT/trace.csv" --profile "$OUT/profile.yaml" --policy dopd \
  --budget "$budget" --slo-ttft 2 --slo-tpot 0.2 --kv-link-gbps 0.5 --ultra-short-max-isl 32 \
  --json >"$OUT/sim-dopd.json"

python3 - "$OUT" "$budget" <<'PY'
import json, re, sys
out, budget = sys.argv[1], sys.argv[2]
for name, label in [("static", "planner off (1P+1D)"), ("dopd", f"planner on (budget {budget} workers)")]:
    real = json.load(open(f"{out}/real-{name}.json")); sim = json.load(open(f"{out}/sim-{name}.json"))["summary"]
    print(f"-- {label}")
    print(f"{'metric':<10} {'dopd up':>10} {'dopd sim':>10} {'error':>8}")
    for k in ["ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90"]:
        r, s = real[k + "_s"], sim[k + "_s"]
        print(f"{k:<10} {r * 1e3:>8.0f}ms {s * 1e3:>8.0f}ms {100 * (s - r) / r:>+7.0f}%")
    print(f"requests: real {real['requests']} ({real['ok']} ok), sim {sim['requests']}")
real_t = [(float(m.group(1)), m.group(2)) for m in
          (re.search(r"t=(\d+)s ready \d+:\d+ \(target (\d+:\d+)", l) for l in open(f"{out}/up-dopd.log")) if m]
sim_t = [(p["t_s"], f"{p['target_prefill']}:{p['target_decode']}") for p in json.load(open(f"{out}/sim-dopd.json"))["intervals"]]
print("-- planner targets (prefill:decode) per tick")
print("dopd up : " + " ".join(f"{t:.0f}s={v}" for t, v in real_t))
print("dopd sim: " + " ".join(f"{t:.0f}s={v}" for t, v in sim_t))
PY
