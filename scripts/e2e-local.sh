#!/usr/bin/env bash
# Brings up the local system (`dopd up`: router, one prefill and one decode worker, planner) on
# loopback with the default model and drives it with the official openai Python client
# (scripts/e2e-openai.py). Usage: scripts/e2e-local.sh [path/to/dopd]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/dopd}
LOG=$(mktemp)
"$BIN" up --listen 127.0.0.1:0 --interval 2s --kv-blocks 256 >"$LOG" 2>&1 &
PID=$!
trap 'kill -INT $PID 2>/dev/null || true; wait $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
URL=""
for _ in $(seq 1 600); do
  URL=$(grep -o 'http://[0-9.:]*/v1' "$LOG" | head -1 || true)
  [ -n "$URL" ] && break
  kill -0 $PID 2>/dev/null || { cat "$LOG"; echo "e2e: dopd up exited" >&2; exit 1; }
  sleep 0.1
done
[ -n "$URL" ] || { cat "$LOG"; echo "e2e: dopd up printed no URL" >&2; exit 1; }
MODEL=$(sed -n 's/^dopd up: serving \(.*\) on http.*/\1/p' "$LOG" | head -1)
HOST=${URL%/v1}
for _ in $(seq 1 300); do
  curl -fsS "$HOST/health" >/dev/null 2>&1 && break
  sleep 0.2
done
echo "e2e: dopd up serves $MODEL at $URL"
python3 scripts/e2e-openai.py "$URL" "$MODEL"
metrics=$(curl -fsS "$HOST/metrics")
grep -q dopd_router_routing_decisions_total <<<"$metrics" || { echo "e2e: the router exports no routing metrics" >&2; exit 1; }
echo "e2e: ok"
