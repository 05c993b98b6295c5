#!/usr/bin/env bash
# Builds the release binary here (x86_64 Linux, against the PyTorch 2.11 wheel of `make setup`)
# and puts a stripped copy in dist/, which travels to a GPU machine with the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# With kd-native's `cuda` feature: CUDA graphs and device properties (the CUDA runtime headers
# come with the PyTorch wheel's CUDA libraries).
cargo build --release -p kd-run --features kd-native/cuda
mkdir -p dist
strip -o dist/kd-run target/release/kd-run
ls -l dist/kd-run
