#!/usr/bin/env bash
# What metrics and spans cost: an A/B in one run. Two `dropline serve`s on temporary data
# directories, the same release binary, one with its instrumentation on (the default) and one
# with `--telemetry off` (a hidden flag that exists only for this measurement), both logging
# at the default `info` to a file. Each round loads both in turn (the order alternating) with
# the same `dropline-load hot-sku` burst and reads each server's CPU time per reserve (the
# settling after the burst included); the report gives every burst, the mean per server and
# the overhead of "on" over "off". docs/benchmarks.md has the method and the figures.
# Usage: scripts/bench-telemetry.sh [--rounds N] [hot-sku flags, e.g. --attempts 100000]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3
if [[ "${1:-}" == "--rounds" ]]; then
  rounds=$2
  shift 2
fi
cargo build --release --locked -p client -p load-tests
target=${CARGO_TARGET_DIR:-target}
export DROPLINE_OPERATOR_TOKEN=${DROPLINE_OPERATOR_TOKEN:-load-test-operator-token}
work=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
declare -A port=([on]=${DROPLINE_BENCH_PORT_ON:-50061} [off]=${DROPLINE_BENCH_PORT_OFF:-50062})
for mode in on off; do
  "$target/release/dropline" serve --data-dir "$work/$mode" --listen "127.0.0.1:${port[$mode]}" \
    --http-listen 127.0.0.1:0 --telemetry "$mode" >"$work/$mode.log" 2>&1 &
  pids+=($!)
done
declare -A sum=([on]=0 [off]=0)
declare -A count=([on]=0 [off]=0)
for ((round = 1; round <= rounds; round++)); do
  if ((round % 2)); then order=(on off); else order=(off on); fi
  for mode in "${order[@]}"; do
    out="$work/round-$round-$mode.txt"
    "$target/release/dropline-load" hot-sku --target "http://127.0.0.1:${port[$mode]}" --rounds 1 \
      --skip-echo --skip-stream --skip-redis "$@" >"$out" 2>"$out.err" || { cat "$out" "$out.err"; exit 1; }
    # "dropline #1  <server µs>  <settling µs>  <generator µs>" under "CPU µs per call".
    cpu=$(awk '/^CPU µs per call/ { table = 1; next } table && /^dropline #1/ { print $3 + $4; exit }' "$out")
    echo "round $round, telemetry $mode: server CPU ${cpu} µs per reserve; $(grep -m1 '^dropline #1' "$out")"
    sum[$mode]=$(awk -v a="${sum[$mode]}" -v b="$cpu" 'BEGIN { print a + b }')
    count[$mode]=$((count[$mode] + 1))
  done
done
awk -v on="${sum[on]}" -v off="${sum[off]}" -v n_on="${count[on]}" -v n_off="${count[off]}" 'BEGIN {
  on /= n_on; off /= n_off
  printf "mean server CPU per reserve: telemetry on %.2f µs, off %.2f µs: overhead %.1f %%\n", on, off, (on - off) * 100 / off
}'
