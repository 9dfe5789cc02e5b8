#!/usr/bin/env bash
# The CPU quickstart: GBLR against hand-crafted structures on the digits workload, SQLite storage
# beside the spec, a local Ray; then the study's front and the static dashboard report.
set -euo pipefail
cd "$(dirname "$0")/.."
GSM=.venv/bin/gsmsearch
if "$GSM" status studies/quickstart.yaml >/dev/null 2>&1; then
  "$GSM" launch studies/quickstart.yaml --resume     # continue (or no-op when already complete)
else
  "$GSM" launch studies/quickstart.yaml
fi
"$GSM" status studies/quickstart.yaml
if "$GSM" report --help >/dev/null 2>&1; then
  "$GSM" report studies/quickstart.yaml -o quickstart-report.html
  echo "report: $(pwd)/quickstart-report.html"
fi
