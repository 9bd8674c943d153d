#!/usr/bin/env bash
# Run HERE, before asking for a lent GPU machine: fills .device/ (git-ignored) with what that machine's image
# lacks, for the device tool to carry (`carry: [".device"]`, 64 MiB at most):
#   .device/ComfyUI  the host's tree (COMFYUI_DIR or ~/ComfyUI), tests left out
#   .device/whl      wheels for the image's Python 3.12 of the packages the benchmarks import that it lacks
# Then, on the machine: bash bench/device_run.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HOST="${COMFYUI_DIR:-$HOME/ComfyUI}"
[ -f "$HOST/comfy/sd.py" ] || { echo "no ComfyUI at $HOST: set COMFYUI_DIR" >&2; exit 1; }
rm -rf .device
mkdir -p .device/ComfyUI .device/whl
tar -C "$HOST" --exclude=./tests --exclude=./tests-unit --exclude='__pycache__' -cf - . | tar -C .device/ComfyUI -xf -
# av: comfy_api's video types (imported with comfy_api.latest); torchsde + trampoline: the host's samplers.
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .device/whl av==18.1.0 torchsde==0.2.6 trampoline==0.1.2
du -sh .device .device/*
