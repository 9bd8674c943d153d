#!/usr/bin/env bash
# Every benchmark of the pack, one after the other, each printing its table:
#   bash bench/run_all.sh            # CPU (tiny checkpoints)
#   DEVICE=cuda bash bench/run_all.sh  # on a GPU machine (full-size random-weight architectures for training)
# Run it inside the project's venv (scripts/setup_env.sh prints its path) with COMFYUI_DIR set.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEVICE="${DEVICE:-cpu}"
PY="${PYTHON:-python}"
HOST="${COMFYUI_DIR:-$HOME/ComfyUI}"
echo "## guidance overhead ($DEVICE)"
COMFYUI_DIR="$HOST" "$PY" bench/guidance_overhead.py --device "$DEVICE" --families sd1 sdxl flux \
  --size "${SIZE:-256}" --steps "${STEPS:-4}" --repeats "${REPEATS:-5}" 2>/dev/null | grep --line-buffered -E "^(family|sd1|sdxl|flux)"
echo
echo "## train residual ($DEVICE)"
COMFYUI_DIR="$HOST" "$PY" bench/train_residual.py --comfyui "$HOST" --device "$DEVICE" --steps "${TRAIN_STEPS:-6}" \
  2>/dev/null | grep --line-buffered -E "\|"
if [ "$DEVICE" = cpu ]; then
  echo
  echo "## toy world: presence and in-box rates, unguided and guided"
  COMFYUI_DIR="$HOST" "$PY" bench/toy_world.py --samplers ${SAMPLERS:-euler} 2>/dev/null
fi
