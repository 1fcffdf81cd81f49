#!/usr/bin/env bash
# Installs what the browser tests need when it is missing: Debian's Chromium and its
# WebDriver (chromedriver), and axe-core (the accessibility checker the tests run in each
# page) from the npm registry into .tools/axe, pinned. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

AXE_VERSION=4.14.1

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi

if [ ! -f ".tools/axe/node_modules/axe-core/axe.min.js" ] \
  || ! grep -q "\"version\": \"$AXE_VERSION\"" .tools/axe/node_modules/axe-core/package.json; then
  if ! command -v npm >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null
  fi
  mkdir -p .tools/axe
  npm install --silent --no-audit --no-fund --prefix .tools/axe "axe-core@$AXE_VERSION" >/dev/null
fi
echo "browser tests: $(chromium --version 2>/dev/null | head -1), $(chromedriver --version | head -1), axe-core $AXE_VERSION"
