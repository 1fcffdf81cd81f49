#!/usr/bin/env bash
# Runs Dropline's whole test suite on a fresh Debian/Ubuntu machine with a Rust toolchain,
# installing whatever is missing first. This is the README's test command; CI calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."

# rustfmt is part of the check; rustup installs it when the toolchain lacks it.
if ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add rustfmt
fi

# Nothing else to install yet: protoc is vendored (protoc-bin-vendored) and storage is
# embedded (sled). Cluster tests will install their pinned NATS server here.

cargo fmt --all --check
cargo build --workspace --all-targets --locked
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads 2 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary, the last often a
# doc-test run with nothing in it).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\nall tests: %d passed, %d failed\n", p, f }' "$log"
