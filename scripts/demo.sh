#!/usr/bin/env bash
# Sets everything up on a fresh machine and runs the pack's main job through the real ComfyUI host,
# writing its results under output/.  Options go to scripts/demo.py (e.g. --ckpt /path/to/model.safetensors).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
env_lines="$(bash scripts/setup_env.sh)"
COMFYUI_DIR="$(sed -n 's/^COMFYUI_DIR=//p' <<<"$env_lines")"
VENV="$(sed -n 's/^VENV=//p' <<<"$env_lines")"
export COMFYUI_DIR
exec "$VENV/bin/python" scripts/demo.py "$@"
