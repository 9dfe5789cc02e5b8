#!/usr/bin/env bash
# The CPU quickstart: GBLR against hand-crafted structures on the digits workload.
# (The search service, `gsmsearch launch studies/quickstart.yaml`, replaces this once it lands.)
set -euo pipefail
cd "$(dirname "$0")/.."
for family in dense gblr lowrank blockdiag monarch; do
  .venv/bin/gsmsearch train --workload digits-mlp --family "$family" --budget 0.25 --epochs 15 --no-latency
done
