#!/usr/bin/env bash
# One-time setup, idempotent: a project-local Python venv with the PyTorch 2.11.0 wheel (which
# carries libtorch), a stable link .venv/libtorch that .cargo/config.toml points cargo at, and
# MNIST under data/mnist. Each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
PYTHON=${PYTHON:-python3}

if ! .venv/bin/python -c "import torch, numpy, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup: installing torch==$TORCH_VERSION into .venv (about 5 GB with its CUDA libraries)"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
fi

torch_dir=$(.venv/bin/python -c "import os, torch; print(os.path.dirname(torch.__file__))")
if [ "$(readlink .venv/libtorch 2>/dev/null)" != "$torch_dir" ]; then
    ln -sfn "$torch_dir" .venv/libtorch
fi

.venv/bin/python scripts/fetch_mnist.py --out data/mnist "$@"
