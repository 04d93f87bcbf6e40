#!/usr/bin/env bash
# Everything a fresh Debian machine needs, idempotent: system packages, the venv, the project.
# Usage: bash scripts/setup.sh            (as root, or with passwordless sudo for the apt step)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(mosquitto mosquitto-clients dataset-fashion-mnist)
missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  echo "[setup] apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# the broker is started per test session by the tests themselves; don't leave a system one holding 1883
if command -v systemctl >/dev/null 2>&1; then systemctl stop mosquitto >/dev/null 2>&1 || true; fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: a venv holding both has a
# broken mix.  The test set-up is CPU-only and takes onnxruntime (a venv made before the install
# profiles holds onnxruntime-gpu: swap it).  See README, "Install profiles", for the GPU swap.
if .venv/bin/python -m pip show -q onnxruntime-gpu >/dev/null 2>&1; then
  echo "[setup] swapping onnxruntime-gpu for onnxruntime (CPU)"
  .venv/bin/python -m pip uninstall -q -y onnxruntime-gpu onnxruntime
fi
# torch/torchvision are pinned in the extras that bring them (torch==2.14.1, torchvision==0.29.1)
echo "[setup] pip install -e .[test]"
.venv/bin/python -m pip install -q -e ".[test]"
echo "[setup] done: $(.venv/bin/python -c 'import torch, onnxruntime; print("torch", torch.__version__, "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())')"
