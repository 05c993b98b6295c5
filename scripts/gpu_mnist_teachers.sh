#!/usr/bin/env bash
# The MNIST headline teachers (experiments/mnist/headline.toml, seeds 1 to 3) trained at once,
# as three processes, on one GPU machine; the students then train from their checkpoints on a
# CPU. On a 2-core CPU each 400-epoch teacher takes about an hour; on one H200 the three took
# 5.7 min each, side by side (experiments/mnist/README.md).
#
# Here:   scripts/gpu_prepare.sh && mkdir -p dist/mnist && cp data/mnist/* dist/mnist/
# There:  scripts/gpu_mnist_teachers.sh            (extra arguments go to every `kd-run run`)
# Back:   tar -xf runs-gpu/mnist_headline_s<seed>.tar -C runs, for seeds 1 to 3, then
#         `make mnist-section` trains the students (the teachers are done) and writes the report.
#
# Each run is packed into one tar under OUT (default runs-gpu), beside the three logs: six
# files in all. A dry run on a CPU:
#   KD_RUN=target/release/kd-run OUT=/tmp/t scripts/gpu_mnist_teachers.sh --set stages.teacher.epochs=1
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
# data/ is not part of the repository: use the copy that travelled in dist/.
if [ ! -e data/mnist/train-images-idx3-ubyte ] && [ -d dist/mnist ]; then
    mkdir -p data && ln -sfn "$PWD/dist/mnist" data/mnist
fi
mkdir -p "$OUT"
start=$(date +%s)
pids=()
for seed in 1 2 3; do
    "$KD_RUN" run experiments/mnist/headline.toml --out "$OUT" --set seed=$seed \
        --set name=mnist_headline_s$seed --only teacher "$@" > "$OUT/teacher_s$seed.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
for seed in 1 2 3; do
    tail -n 3 "$OUT/teacher_s$seed.log"
    if [ -d "$OUT/mnist_headline_s$seed" ]; then
        tar -cf "$OUT/mnist_headline_s$seed.tar" -C "$OUT" "mnist_headline_s$seed"
        rm -rf "${OUT:?}/mnist_headline_s$seed"   # the tar holds it: few files to bring back
    fi
done
rm -rf "${OUT:?}/.cache"
echo "wall time of the teachers: $(( $(date +%s) - start )) s"
exit $status
