#!/usr/bin/env bash
# System packages the test suite needs, installed only when missing (idempotent, instant when present):
#   - Debian's chromium: the dashboard's browser tests drive it with Playwright
#     (`playwright install` cannot download browsers here);
#   - PostgreSQL server binaries: the search tests start a throwaway server on 127.0.0.1;
#   - Debian's slurm-wlm and munge: tests/search/test_slurm.py starts munged, slurmctld and slurmd
#     as a one-node cluster (its own config in a temporary folder; nothing is started here).
# Usage: scripts/test-services.sh        (called by `make test`; needs root or sudo to install)
set -euo pipefail

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  missing+=(postgresql)
fi
slurm=()
for daemon in slurmctld slurmd munged; do
  [ -x "/usr/sbin/$daemon" ] || slurm=(slurm-wlm munge)
done
[ ${#missing[@]} -eq 0 ] && [ ${#slurm[@]} -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "test-services: need root to install: ${missing[*]} ${slurm[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
echo "test-services: installing ${missing[*]} ${slurm[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
[ ${#missing[@]} -eq 0 ] || $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
# without recommends: slurm-wlm recommends every Slurm plugin, with their development files
[ ${#slurm[@]} -eq 0 ] || $SUDO apt-get install -y -qq --no-install-recommends "${slurm[@]}" >/dev/null
# the PostgreSQL package starts a cluster on install; the tests run their own servers
if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_ctlcluster >/dev/null 2>&1; then
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi
[ -x /usr/bin/chromium ] || { echo "test-services: /usr/bin/chromium still missing" >&2; exit 1; }
for daemon in slurmctld slurmd munged; do
  [ -x "/usr/sbin/$daemon" ] || { echo "test-services: /usr/sbin/$daemon still missing" >&2; exit 1; }
done
