#!/usr/bin/env bash
# A decode worker killed during a trace replay loses no request: `dopd up` with one prefill and
# two decode workers (planner off) serves a slice of the Azure conversation trace through
# `dopd bench load`; KILL_AT seconds in, one decode worker is killed with SIGKILL. The router
# resumes its streams on the other decode worker and `dopd up` restarts it. Fails unless every
# request is answered. Usage: scripts/failover-demo.sh [path/to/dopd] [trace]
# The default load stays within what three one-thread workers serve on two cores.
# Settings (environment): DURATION (60s), KILL_AT (15), RATE_SCALE (0.5), ISL_SCALE (0.05),
# OSL_SCALE (0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/dopd}
TRACE=${2:-../shared/traces/AzureLLMInferenceTrace_conv.csv}
DURATION=${DURATION:-60s}
KILL_AT=${KILL_AT:-15}
OUT=$(mktemp)
. scripts/up-lib.sh
trap 'stop_up; rm -f "$OUT"' EXIT
start_up failover "$BIN" --prefill 1 --decode 2 --max-workers 3 --no-planner || exit 1
echo "failover: dopd up serves at $URL; replaying $DURATION of $TRACE"
"$BIN" bench load --url "$URL" --trace "$TRACE" --duration "$DURATION" \
  --rate-scale "${RATE_SCALE:-0.5}" --isl-scale "${ISL_SCALE:-0.05}" --osl-scale "${OSL_SCALE:-0.5}" \
  --ttft-slo 10s --json >"$OUT" &
BENCH=$!
sleep "$KILL_AT"
# The victim: a decode worker that is streaming (waits up to 20 s for one), found by the port
# it listens on among the children of dopd up that run `--role decode`.
VICTIM=$(python3 - "$HOST" "$PID" <<'PY' || true
import json, os, sys, time, urllib.request
host, parent = sys.argv[1], sys.argv[2]

def decode_pids():
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            cmd = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if stat[1] == parent and b"--role" in cmd and cmd[cmd.index(b"--role") + 1] == b"decode":
            out.append(p)
    return out

def listen_ports(pid):
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:
                ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports

busy = None
for _ in range(200):
    load = json.load(urllib.request.urlopen(host + "/v1/dopd/load"))
    busy = [w for w in load["workers"] if w["role"] == "decode" and w["in_flight"] > 0]
    if busy:
        break
    time.sleep(0.1)
pids = decode_pids()
for w in busy or []:
    port = int(w["url"].rsplit(":", 1)[1].strip("/"))
    for p in pids:
        if port in listen_ports(p):
            print(p)
            sys.exit(0)
print(pids[0] if pids else "")
PY
)
[ -n "$VICTIM" ] || { cat "$LOG"; echo "failover: no decode worker found" >&2; exit 1; }
kill -KILL "$VICTIM"
echo "failover: killed decode worker $VICTIM at ${KILL_AT}s"
wait $BENCH
cat "$OUT"
python3 - "$OUT" "$HOST" <<'EOF'
import json, sys, urllib.request
s = json.load(open(sys.argv[1]))
load = json.load(urllib.request.urlopen(sys.argv[2] + "/v1/dopd/load"))
def find(v):
    if isinstance(v, dict):
        if "resumed" in v:
            return v["resumed"]
        for x in v.values():
            r = find(x)
            if r is not None:
                return r
    return None
resumes = find(load)
print(f"failover: {s['ok']} of {s['requests']} requests ok; router resumes: {resumes}")
sys.exit(0 if s["requests"] > 0 and s["ok"] == s["requests"] else 1)
EOF
grep -E "exited unexpectedly|restart" "$LOG" || true
