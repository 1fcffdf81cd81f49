#!/usr/bin/env bash
# Installs redis-server from Debian's package when it is missing: `dropline-load hot-sku`
# runs it as a baseline (a Lua check-and-decrement with `appendfsync always`). Only the
# benchmark needs it; the tests do not. Prints the server's version.
set -euo pipefail
if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "redis-server is missing and installing it needs root (apt-get install redis-server)" >&2
    exit 1
  fi
  sudo_=""
  [ "$(id -u)" -eq 0 ] || sudo_=sudo
  $sudo_ apt-get update -qq
  # Only the server binary is wanted: the package's service is not started here (hot-sku
  # starts its own server on a temporary directory and port).
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
redis-server --version
