#!/usr/bin/env bash
# The layout the README describes, kept true: the router and the operator build no inference
# engine and neither depends on the other; no source file grows past about 800 lines (outside
# tests).
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
for c in router operator; do
  deps=$(cargo tree -e normal --locked -p "dopd-$c" --prefix none --format '{p}' | awk '{print $1}' | sort -u)
  bad=$(grep -E '^(burn|burn-.*|cubecl.*|dopd-ucx|dopd-worker)$' <<<"$deps" || true)
  if [ "$c" = operator ]; then
    bad+=$(grep -E '^dopd-router$' <<<"$deps" || true)
  fi
  if [ -n "$bad" ]; then
    echo "layout: dopd-$c depends on: $(echo $bad)" >&2
    fail=1
  fi
done
limit=820
while IFS= read -r f; do
  case "$f" in
    */tests/*|*/tests.rs|*/benches/*) continue ;;
  esac
  # Lines before the file's test module, if it has one.
  n=$(awk '/^#\[cfg\(test\)\]/{exit} {n++} END{print n+0}' "$f")
  if [ "$n" -gt "$limit" ]; then
    echo "layout: $f has $n lines outside its tests (limit $limit): split it by job" >&2
    fail=1
  fi
done < <(git ls-files '*.rs')
[ "$fail" = 0 ] && echo "layout: ok"
exit "$fail"
