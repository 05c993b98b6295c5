#!/usr/bin/env bash
# One-time setup, idempotent: a project-local Python venv with the PyTorch 2.11.0 wheel (which
# carries libtorch) and TensorBoard, a stable link .venv/libtorch that .cargo/config.toml points cargo at, the
# Gloo headers for kd-native's `gloo` feature under deps/gloo, and MNIST under data/mnist. Each
# step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=2.11.0
PYTHON=${PYTHON:-python3}

if ! .venv/bin/python -c "import torch, numpy, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup: installing torch==$TORCH_VERSION into .venv (about 5 GB with its CUDA libraries)"
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
fi

# TensorBoard's own event-file reader checks the event files kd-run writes (a test does).
TENSORBOARD_VERSION=2.20.0
if ! .venv/bin/python -c "import tensorboard, sys; sys.exit(tensorboard.__version__ != '$TENSORBOARD_VERSION')" 2>/dev/null; then
    echo "setup: installing tensorboard==$TENSORBOARD_VERSION into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check "tensorboard==$TENSORBOARD_VERSION"
fi

torch_dir=$(.venv/bin/python -c "import os, torch; print(os.path.dirname(torch.__file__))")
if [ "$(readlink .venv/libtorch 2>/dev/null)" != "$torch_dir" ]; then
    ln -sfn "$torch_dir" .venv/libtorch
fi

# kd-native's `gloo` feature compiles against c10d's ProcessGroupGloo, whose Gloo headers the
# wheel lacks. Debian's and Ubuntu's libgloo-dev has them; `apt-get download` and `dpkg-deb -x`
# need no root. Elsewhere, point KD_GLOO_INCLUDE at a Gloo checkout's headers.
if [ -z "${KD_GLOO_INCLUDE:-}" ] && [ ! -f deps/gloo/include/gloo/algorithm.h ]; then
    if command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null; then
        echo "setup: fetching the Gloo headers (Debian's libgloo-dev) into deps/gloo"
        tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download libgloo-dev >/dev/null 2>&1) || {
            apt-get update >/dev/null 2>&1 || true
            (cd "$tmp" && apt-get download libgloo-dev >/dev/null) || {
                echo "setup: could not download libgloo-dev; set KD_GLOO_INCLUDE to a directory holding" \
                     "gloo/algorithm.h (the headers of github.com/facebookincubator/gloo)" >&2
                exit 1
            }
        }
        rm -rf deps/gloo.tmp && mkdir -p deps
        dpkg-deb -x "$tmp"/libgloo-dev_*.deb deps/gloo.tmp
        mkdir -p deps/gloo.tmp/include
        mv deps/gloo.tmp/usr/include/gloo deps/gloo.tmp/include/gloo
        rm -rf deps/gloo.tmp/usr deps/gloo "$tmp"
        mv deps/gloo.tmp deps/gloo
        # kd-native's build script looks for the headers when it runs: make the next build rerun it.
        touch crates/kd-native/build.rs
    else
        echo "setup: no apt-get here, so no Gloo headers: kd-run builds without data parallelism" \
             "(one-process runs work); for it, set KD_GLOO_INCLUDE to a directory holding gloo/algorithm.h" >&2
    fi
fi

# kd-native's `nccl` feature (GPU machines) also needs CCCL's headers, which the CUDA wheels that
# torch installs lack: from the nvidia-cuda-cccl wheel of the same CUDA release, on request.
if [ "${KD_SETUP_NCCL:-0}" = 1 ] && [ -z "${KD_CCCL_INCLUDE:-}" ] && [ ! -e deps/cccl/include/nv/target ]; then
    echo "setup: fetching the CCCL headers (nvidia-cuda-cccl wheel) into deps/cccl"
    tmp=$(mktemp -d)
    .venv/bin/pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "nvidia-cuda-cccl==13.0.85"
    rm -rf deps/cccl.tmp && mkdir -p deps
    .venv/bin/python - "$tmp" deps/cccl.tmp <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/*.whl")[0]
prefix = "nvidia/cu13/include/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = sys.argv[2] + "/include/" + name[len(prefix):]
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(z.read(name))
PY
    rm -rf deps/cccl "$tmp"
    mv deps/cccl.tmp deps/cccl
fi

.venv/bin/python scripts/fetch_mnist.py --out data/mnist "$@"
