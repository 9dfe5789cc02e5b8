#!/usr/bin/env bash
# GPU benchmarks of the layers in one call (CUDA, bf16), then a training step by precision
# (fp32 / bf16 / fp16), then a trial's throughput on 1 worker vs 2 data-parallel workers.
# Skips cleanly without a GPU.
#   bash bench/gpu.sh            # full sizes; writes bench/results/gpu.json
#   bash bench/gpu.sh --smoke    # tiny sizes on any device
# The real structures (a digits trial's layers, MiniLM's fits) are prepared on a CPU machine with
# `.venv/bin/python -m bench.gpu --prepare` into bench/results/gpu-structures/ (git-ignored):
# carry that folder to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' && [ "${1:-}" != "--smoke" ]; then
  echo "bench/gpu.sh: no CUDA device; skipped"
  exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PY" -m bench.gpu "$@"
# the whole training step at fp32 / bf16 / fp16 side by side (time, peak memory): bench/precision_step.py
"$PY" -m bench.precision_step "$@"
# one trial on 1 worker vs 2 data-parallel workers (2 ranks sharing the GPU over gloo; 2 ranks x 1
# GPU over nccl where the machine has 2 GPUs): bench/ddp_throughput.py, writes bench/results/ddp-gpu.json
if [ "${1:-}" = "--smoke" ]; then
  "$PY" -m bench.ddp_throughput --smoke --device "$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')" --out bench/results/ddp-smoke.json
else
  "$PY" -m bench.ddp_throughput --device cuda --options '{"hidden_sizes": [4096, 4096]}' --batch-size 1024 --epochs 5
fi
