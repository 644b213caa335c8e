#!/usr/bin/env bash
# Brings up the local system (`dopd up`: router, one prefill and one decode worker, planner) on
# loopback with the default model and drives it with the official openai Python client
# (scripts/e2e-openai.py). Usage: scripts/e2e-local.sh [path/to/dopd]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug/dopd}
. scripts/up-lib.sh
trap stop_up EXIT
start_up e2e "$BIN" --interval 2s --kv-blocks 256 || exit 1
MODEL=$(sed -n 's/^dopd up: serving \(.*\) on http.*/\1/p' "$LOG" | head -1)
echo "e2e: dopd up serves $MODEL at $URL"
python3 scripts/e2e-openai.py "$URL" "$MODEL"
metrics=$(curl -fsS "$HOST/metrics")
grep -q dopd_router_routing_decisions_total <<<"$metrics" || { echo "e2e: the router exports no routing metrics" >&2; exit 1; }
echo "e2e: ok"
