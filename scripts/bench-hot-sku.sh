#!/usr/bin/env bash
# Runs `dropline-load hot-sku` as docs/benchmarks.md describes: a release build, a fresh
# `dropline serve` on a temporary data directory, and Debian's redis-server for the Redis
# baseline, installed first when missing (scripts/install-redis.sh). Without it (no root,
# no package) the baseline is skipped with a message and the rest still runs.
# Arguments go to hot-sku, e.g. `scripts/bench-hot-sku.sh --rounds 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v redis-server >/dev/null 2>&1; then
  scripts/install-redis.sh || echo "redis-server could not be installed: hot-sku will skip its Redis baseline" >&2
fi
cargo build --release --locked -p client -p load-tests
target=${CARGO_TARGET_DIR:-target}
export DROPLINE_OPERATOR_TOKEN=${DROPLINE_OPERATOR_TOKEN:-load-test-operator-token}
data=$(mktemp -d)
port=${DROPLINE_BENCH_PORT:-50051}
"$target/release/dropline" serve --data-dir "$data" --listen "127.0.0.1:$port" --http-listen 127.0.0.1:0 >"$data.log" 2>&1 &
server=$!
trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -rf "$data" "$data.log"' EXIT
"$target/release/dropline-load" hot-sku --target "http://127.0.0.1:$port" "$@"
