#!/usr/bin/env bash
# The MNIST headline teachers (experiments/mnist/headline.toml, seeds 1 to 3) trained at once,
# as three processes, on one GPU machine; the students then train from their checkpoints on a
# CPU. On a 2-core CPU each 600-epoch teacher would take about 1.5 hours; on one H200 three
# 400-epoch teachers took 5.7 min each, side by side (experiments/mnist/README.md).
#
# Here:   scripts/gpu_prepare.sh && mkdir -p dist/mnist && gzip -c ... (each file of data/mnist
#         as dist/mnist/<name>.gz: a fifth of the size to carry)
# There:  scripts/gpu_mnist_teachers.sh            (extra arguments go to every `kd-run run`;
#         LIMIT=<seconds> stops the teachers, which then resume where they stopped)
# Back:   cat runs-gpu/mnist_teachers.tar.* | tar -xf - -C runs, then `make mnist-section`
#         trains the students (the teachers are done) and writes the report.
#
# The three run directories are packed into one tar under OUT (default runs-gpu), in parts of at
# most 15 MB, beside the three logs. A dry run on a CPU:
#   KD_RUN=target/release/kd-run OUT=/tmp/t scripts/gpu_mnist_teachers.sh --set stages.teacher.epochs=1
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
# data/ is not part of the repository: use the copy that travelled in dist/.
if [ ! -e data/mnist/train-images-idx3-ubyte ] && [ -d dist/mnist ]; then
    mkdir -p data/mnist
    for f in dist/mnist/*; do
        case "$f" in
            *.gz) gunzip -c "$f" > "data/mnist/$(basename "$f" .gz)" ;;
            *) cp "$f" data/mnist/ ;;
        esac
    done
fi
mkdir -p "$OUT"
start=$(date +%s)
pids=()
for seed in 1 2 3; do
    ${LIMIT:+timeout "$LIMIT"} "$KD_RUN" run experiments/mnist/headline.toml --out "$OUT" --set seed=$seed \
        --set name=mnist_headline_s$seed --only teacher "$@" > "$OUT/teacher_s$seed.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
runs=()
for seed in 1 2 3; do
    tail -n 3 "$OUT/teacher_s$seed.log"
    if [ -d "$OUT/mnist_headline_s$seed" ]; then runs+=("mnist_headline_s$seed"); fi
done
rm -rf "${OUT:?}/.cache"
if [ ${#runs[@]} -gt 0 ]; then
    tar -cf - -C "$OUT" "${runs[@]}" | split -b 15M -d - "$OUT/mnist_teachers.tar."
    for run in "${runs[@]}"; do rm -rf "${OUT:?}/$run"; done   # the tar holds them: few files to bring back
fi
ls -l "$OUT"
echo "wall time of the teachers: $(( $(date +%s) - start )) s"
exit $status
