#!/usr/bin/env bash
# Sets everything up on a fresh machine (host, venv, tiny checkpoints, the toy world) and runs the whole test suite:
# ruff, then pytest (core tests on tiny tensors + host tests through the real ComfyUI).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k residual,  or one tier:  bash scripts/test.sh -m core
# (tiers and their costs: docs/testing.md). Without -m every tier runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
env_lines="$(bash scripts/setup_env.sh)"
COMFYUI_DIR="$(sed -n 's/^COMFYUI_DIR=//p' <<<"$env_lines")"
VENV="$(sed -n 's/^VENV=//p' <<<"$env_lines")"
export COMFYUI_DIR
echo "[cones2] host: $COMFYUI_DIR  venv: $VENV"
"$VENV/bin/ruff" check .
# The trained toy world (harness/toy_world.py) is built once into its cache here, where its progress shows.
"$VENV/bin/python" harness/toy_world.py --comfyui "$COMFYUI_DIR" >/dev/null
start=$(date +%s)
set +e
"$VENV/bin/python" -m pytest tests "$@"
rc=$?
set -e
echo "[cones2] test wall time: $(( $(date +%s) - start )) s"
exit $rc
