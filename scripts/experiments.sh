#!/usr/bin/env bash
# Reproduces docs/experiments.md: every table under docs/experiments/ and every plot under
# docs/img/e*/ (about fifteen minutes on 2 cores). Run from the repository root after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p dopd
# E1-E4 reproduce the paper's setting: prefill work queues on the instance picked at arrival.
# The scoreboard runs the router's default (the shared, deadline-first prefill queue) and shows
# the per-instance queue as an ablation.
pq=(--prefill-queue per-instance)
dopd=./target/release/dopd
out=docs/experiments
mkdir -p "$out" docs/img/e1 docs/img/e2 docs/img/e3 docs/img/e4

echo "== E1: prefill sweep at one decode instance"
"$dopd" plan --isl 1000 --osl 245 --requests 300 --budget 100 --prefill-rule per-decode-instance > "$out/e1-plan.txt"
"$dopd" sim compare "${pq[@]}" --synthetic examples/workloads/e1-fixed-lengths.yaml --budget 100 \
  --policies static:1x1,static:2x1,static:3x1,static:4x1,static:5x1,static:6x1 \
  --plot-dir docs/img/e1 > "$out/e1-sweep.txt"

echo "== E2: DOPD vs aggregated at 8 GPUs, rising rate (conversation trace)"
: > "$out/e2-conv.txt"
for s in 1 2 3 4; do
  echo "-- rate scale $s" >> "$out/e2-conv.txt"
  "$dopd" sim compare "${pq[@]}" --trace traces/AzureLLMInferenceTrace_conv.csv --budget 8 --rate-scale "$s" \
    --policies dopd-paper,aggregated,static:search >> "$out/e2-conv.txt"
done
"$dopd" sim compare "${pq[@]}" --trace traces/AzureLLMInferenceTrace_conv.csv --budget 8 --rate-scale 2 \
  --policies dopd-paper,aggregated --plot-dir docs/img/e2 > /dev/null

: > "$out/e2-code.txt"
for s in 0.25 0.5 1; do
  echo "-- rate scale $s" >> "$out/e2-code.txt"
  "$dopd" sim compare "${pq[@]}" --trace traces/AzureLLMInferenceTrace_code.csv --budget 8 --rate-scale "$s" \
    --policies dopd-paper,aggregated,static:search >> "$out/e2-code.txt"
done

echo "== E3: fixed 1P+1D, with and without DOPD's length-aware routing"
: > "$out/e3.txt"
for t in conv code; do
  for s in 0.5 1; do
    echo "-- $t, rate scale $s" >> "$out/e3.txt"
    "$dopd" sim compare "${pq[@]}" --trace "traces/AzureLLMInferenceTrace_$t.csv" --rate-scale "$s" \
      --policies static:1x1,dopd-static:1x1 >> "$out/e3.txt"
  done
done

"$dopd" sim compare "${pq[@]}" --trace traces/AzureLLMInferenceTrace_conv.csv --rate-scale 1 \
  --policies static:1x1,dopd-static:1x1 --plot-dir docs/img/e3 > /dev/null

echo "== E4: bursty workload from 1P+1D"
"$dopd" sim compare "${pq[@]}" --synthetic examples/workloads/bursty.yaml --budget 8 \
  --policies dopd-paper,oracle,dyn-sla,dyn-load \
  --plot-dir docs/img/e4 > "$out/e4.txt"
echo "== The scoreboard: every policy on every row of examples/scoreboard/suite.yaml"
"$dopd" sim scoreboard --suite examples/scoreboard/suite.yaml --out "$out/scoreboard.md" > /dev/null
echo "== The flash crowd beside its base alone (same arrivals until the crowd)"
"$dopd" sim scoreboard --suite examples/scoreboard/flash-onset.yaml \
  --policies dopd,dopd-paper,static:search,oracle,static:1x1,static:2x1,static:3x1,static:2x2 \
  --out "$out/flash-onset.md" > /dev/null
echo "== Ablations of dopd's mechanisms, same rows"
"$dopd" sim scoreboard --suite examples/scoreboard/suite.yaml \
  --policies dopd,dopd-arima,dopd-last,dopd-open-loop,dopd-no-trend,dopd-ratio-surges,dopd-idle-shrink,dopd-hold-dispersion,dopd-no-hold,dopd-no-kv-calibration,dopd-fixed-bypass,dopd-no-bypass,dopd-bypass-when-full,dopd-kv-full-hold,dopd-no-kv-emergency,dopd-fifo-model,static:search \
  --out "$out/ablations.md" > /dev/null
echo "== Held-out workloads (examples/scoreboard/heldout.yaml), every policy"
"$dopd" sim scoreboard --suite examples/scoreboard/heldout.yaml --out "$out/heldout.md" > /dev/null
echo "== Ablation of the shared prefill queue: the same rows with per-instance queues"
"$dopd" sim scoreboard --suite examples/scoreboard/suite.yaml --policies dopd,static:search \
  "${pq[@]}" --out "$out/ablation-per-instance-queue.md" > /dev/null
echo "done: $out/*.txt, $out/*.md and docs/img/e*/"
