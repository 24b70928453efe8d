#!/usr/bin/env bash
# Set up everything PlugKit's demo, tests and benchmarks need, idempotently:
# a venv, torch, the ComfyUI host (COMFYUI_PATH or the pinned 0.3.75), its requirements, test deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PLUGKIT_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
fi
VPY="$VENV/bin/python"

if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
    *) TORCH="torch==2.14.1 torchvision==0.29.1" ;;
  esac
  echo "[setup] installing $TORCH"
  "$VPY" -m pip install --quiet $TORCH
fi

HOST=$("$VPY" -m tools.harness.host)
echo "[setup] ComfyUI host: $HOST"

# ComfyUI >= 0.20 imports torchaudio when loading comfy.sd. There is no torchaudio build for torch
# 2.14; 2.11.1 works with it (its pinned torch would replace ours, hence --no-deps).
if grep -qi "^torchaudio" "$HOST/requirements.txt" && ! "$VPY" -c "import torchaudio" 2>/dev/null; then
  case "$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")" in
    2.14.*) AUDIO="torchaudio==2.11.1" ;;
    *) AUDIO="torchaudio==$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")" ;;
  esac
  echo "[setup] installing $AUDIO (this ComfyUI imports it)"
  "$VPY" -m pip install --quiet --no-deps "$AUDIO"
fi

STAMP="$VENV/.plugkit-setup-$(cat "$HOST/requirements.txt" requirements.txt tests/requirements.txt | sha256sum | cut -c1-16)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing ComfyUI's requirements and the test dependencies"
  "$VPY" -m tools.harness.host requirements > "$VENV/host-requirements.txt"
  "$VPY" -m pip install --quiet -r "$VENV/host-requirements.txt" -r requirements.txt -r tests/requirements.txt
  touch "$STAMP"
fi
