#!/usr/bin/env bash
# The one GPU benchmark script, for the lent GPU machine (after bench/device_prepare.sh here):
#   run: command "bash bench/device_run.sh", carry [".device"], timeout_s 540
# Installs the carried wheels, points the benchmarks at the carried ComfyUI and runs every benchmark on CUDA
# (guidance overhead, then training: full-size random-weight SD1.5 / SD2.1-v / SDXL), each printing its table;
# the whole log is also written to $OUT/device_bench.txt. Budget: under 8 minutes.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"  # PYTHON / DEVICE overrides: a CPU rehearsal here (DEVICE=cpu PYTHON=<venv python>)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .device/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site COMFYUI_DIR="$PWD/.device/ComfyUI" PYTHONUNBUFFERED=1
LOG="${OUT:-/tmp}/device_bench.txt"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available()
else 'no GPU')" | tee "$LOG"
timeout "${BUDGET_S:-460}" env PYTHON="$PY" DEVICE="${DEVICE:-cuda}" SIZE="${SIZE:-1024}" TRAIN_STEPS="${TRAIN_STEPS:-4}" \
  CONES2_CKPT_DIR="${CONES2_CKPT_DIR:-/tmp/cones2-ckpt}" bash bench/run_all.sh 2>&1 | tee -a "$LOG"
