#!/usr/bin/env bash
# Sets up everything the demo and the tests need, on a fresh machine:
#   1. finds the ComfyUI host (COMFYUI_DIR, the pack's grandparent when it sits in ComfyUI/custom_nodes/,
#      then ~/ComfyUI), or clones the pinned release into ~/ComfyUI;
#   2. builds a virtual environment (cached under ~/.cache/comfyui-cones2/, keyed by a hash of what
#      built it) with the host's requirements, this pack's requirements and the dev tools, all under
#      constraints.txt so that torch stays pinned.
# Prints two lines on stdout: COMFYUI_DIR=... and VENV=...  (progress goes to stderr).
set -euo pipefail
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFYUI_TAG="${COMFYUI_TAG:-v0.3.64}"
log() { echo "[cones2-setup] $*" >&2; }

find_host() {
  if [ -n "${COMFYUI_DIR:-}" ]; then
    if [ -f "$COMFYUI_DIR/main.py" ] && [ -d "$COMFYUI_DIR/comfy" ]; then echo "$COMFYUI_DIR"; return 0; fi
    log "COMFYUI_DIR=$COMFYUI_DIR is set but holds no ComfyUI (no main.py / comfy/)."; return 1
  fi
  local gp; gp="$(cd "$PACK_DIR/../.." && pwd)"
  if [ "$(basename "$(dirname "$PACK_DIR")")" = "custom_nodes" ] && [ -f "$gp/main.py" ]; then echo "$gp"; return 0; fi
  if [ -f "$HOME/ComfyUI/main.py" ]; then echo "$HOME/ComfyUI"; return 0; fi
  return 1
}

HOST="$(find_host || true)"
if [ -z "$HOST" ]; then
  if [ -n "${COMFYUI_DIR:-}" ]; then exit 1; fi
  log "No ComfyUI found; cloning $COMFYUI_TAG into ~/ComfyUI (what a user's machine would do)."
  if ! git clone --quiet --depth 1 --branch "$COMFYUI_TAG" https://github.com/comfyanonymous/ComfyUI "$HOME/ComfyUI" >&2; then
    log "ERROR: could not find or clone ComfyUI. Export ComfyUI $COMFYUI_TAG into ~/ComfyUI"
    log "       (or set COMFYUI_DIR to a ComfyUI checkout) and run this again."
    exit 1
  fi
  HOST="$HOME/ComfyUI"
fi
log "host: $HOST"

PY="${CONES2_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do if command -v "$c" >/dev/null 2>&1; then PY="$(command -v "$c")"; break; fi; done
fi
[ -n "$PY" ] || { log "ERROR: no python3 found"; exit 1; }

# The venv key: everything that decides what gets installed.
KEY="$( { "$PY" --version 2>&1; cat "$PACK_DIR/constraints.txt" "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" "$HOST/requirements.txt"; echo v1; } | sha256sum | cut -c1-16)"
VENV="${CONES2_VENV:-$HOME/.cache/comfyui-cones2/venv-$KEY}"
if [ ! -f "$VENV/.complete" ]; then
  log "building virtual environment $VENV (torch is large: this takes a few minutes once)"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PY" -m venv "$VENV"
  pip_quiet() { grep -v -E "is ignored: it is neither a file nor a directory" >&2 || true; }
  PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$PACK_DIR/constraints.txt")
  "${PIP[@]}" torch==2.14.1 torchvision==0.29.1 2>&1 | pip_quiet
  # torchaudio has no build for the pinned torch here and only the host's audio nodes use it.
  grep -v -E '^\s*torchaudio' "$HOST/requirements.txt" > "$VENV/host-requirements.txt"
  "${PIP[@]}" -r "$VENV/host-requirements.txt" -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt" 2>&1 | pip_quiet
  "$VENV/bin/python" - <<'PY' >&2
import torch, torchvision  # noqa: F401
assert torch.__version__.startswith("2.14.1"), torch.__version__
PY
  touch "$VENV/.complete"
fi
echo "COMFYUI_DIR=$HOST"
echo "VENV=$VENV"
