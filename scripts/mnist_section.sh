#!/usr/bin/env bash
# Runs the paper's whole MNIST section (section 3) from scratch and writes docs/results/mnist.md:
# the headline rows with three seeds, the variants (hard-target term, logit matching), the
# omitted-3 and only-7-and-8 transfer sets, the temperature sweep, and (beyond the paper) the
# distilled student on a translated transfer set. Extra arguments go to every
# `kd-run run` (e.g. `--set threads=1`). Finished stages are skipped, so a killed run picks up where it stopped.
# The schedules were chosen beforehand on validation splits (experiments/mnist/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
KD_RUN=${KD_RUN:-target/release/kd-run}
start=$(date +%s)
for seed in 1 2 3; do
    "$KD_RUN" run experiments/mnist/headline.toml --set seed=$seed --set name=mnist_headline_s$seed "$@"
done
for file in omitted3 only78 variants temperature translated_transfer; do
    "$KD_RUN" run experiments/mnist/$file.toml "$@"
done
"$KD_RUN" report --title "MNIST (section 3 of the paper)" --out docs/results/mnist.md \
    runs/mnist_headline_s1 runs/mnist_headline_s2 runs/mnist_headline_s3 runs/mnist_variants \
    runs/mnist_omitted3 runs/mnist_only78 runs/mnist_temperature runs/mnist_translated_transfer
echo "wall time of the section: $(( ($(date +%s) - start) / 60 )) min"
