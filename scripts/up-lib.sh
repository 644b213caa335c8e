# Sourced by scripts that bring `dopd up` up on loopback.
#   start_up NAME BIN [ARGS...]  starts `BIN up --listen 127.0.0.1:0 ARGS...` with its log in
#                                $LOG, waits until it prints its URL and answers /health, and
#                                sets PID, URL (ending in /v1) and HOST; NAME prefixes errors.
#   stop_up                      stops it (Ctrl-C, then waits) and removes the log; for the
#                                caller's EXIT trap.
PID=""
LOG=""

start_up() {
  local name=$1 bin=$2
  shift 2
  LOG=$(mktemp)
  "$bin" up --listen 127.0.0.1:0 "$@" >"$LOG" 2>&1 &
  PID=$!
  URL=""
  for _ in $(seq 1 600); do
    URL=$(grep -o 'http://[0-9.:]*/v1' "$LOG" | head -1 || true)
    [ -n "$URL" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "$name: dopd up exited" >&2; return 1; }
    sleep 0.1
  done
  [ -n "$URL" ] || { cat "$LOG"; echo "$name: dopd up printed no URL" >&2; return 1; }
  HOST=${URL%/v1}
  for _ in $(seq 1 300); do
    curl -fsS "$HOST/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  cat "$LOG"
  echo "$name: dopd up never answered /health" >&2
  return 1
}

stop_up() {
  if [ -n "$PID" ]; then
    kill -INT "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
  fi
  [ -z "$LOG" ] || rm -f "$LOG"
}
