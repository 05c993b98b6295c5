#!/usr/bin/env bash
# Runs the paper's whole MNIST section (section 3) from scratch and writes docs/results/mnist.md:
# the headline rows with three seeds, the variants (hard-target term, logit matching), the
# omitted-3 and only-7-and-8 transfer sets, the temperature sweep, and (beyond the paper) the
# distilled student on a translated transfer set and the student of the three teachers'
# ensemble. Extra arguments go to every
# `kd-run run` (e.g. `--set device=cpu`). Finished stages are skipped, so a killed run picks up
# where it stopped. The schedules were chosen beforehand on validation splits
# (experiments/mnist/README.md).
#
# JOBS=2 (the default) runs two experiment files at a time, each on one CPU thread: the seed-1
# headline run and then the five files that read its teacher in one lane, the seed-2 and seed-3
# headline runs in the other. On two cores that beats one file at a time on two threads, since
# the students' small batches keep a second thread mostly idle. JOBS=1 runs the files one after
# another with libtorch's default thread count.
set -euo pipefail
cd "$(dirname "$0")/.."
KD_RUN=${KD_RUN:-target/release/kd-run}
JOBS=${JOBS:-2}
start=$(date +%s)
threads=()
if [ "$JOBS" = 2 ]; then
    threads=(--set threads=1)
elif [ "$JOBS" != 1 ]; then
    echo "mnist_section.sh: JOBS must be 1 or 2, not '$JOBS'" >&2
    exit 2
fi
headline() {
    "$KD_RUN" run experiments/mnist/headline.toml --set seed="$1" --set name="mnist_headline_s$1" "${threads[@]}" "${@:2}"
}
# The seed-1 headline run, then the files that distill from its teacher.
lane_a() {
    headline 1 "$@"
    for file in omitted3 only78 variants temperature translated_transfer; do
        "$KD_RUN" run "experiments/mnist/$file.toml" "${threads[@]}" "$@"
    done
}
lane_b() {
    headline 2 "$@"
    headline 3 "$@"
}
if [ "$JOBS" = 2 ]; then
    # Each lane's lines carry its letter; progress bars give way to one log line per epoch.
    (lane_a "$@" 2>&1 | sed -u 's/^/[a] /') &
    a=$!
    (lane_b "$@" 2>&1 | sed -u 's/^/[b] /') &
    b=$!
    # Both lanes run to their end even if the other fails; the section fails if either does.
    status=0
    wait "$a" || status=$?
    wait "$b" || status=$?
    if [ "$status" != 0 ]; then
        exit "$status"
    fi
else
    lane_a "$@"
    lane_b "$@"
fi
# Beyond the paper, once all three teachers exist: the student of their ensemble.
"$KD_RUN" run experiments/mnist/teacher_ensemble.toml "${threads[@]}" "$@"
runs=(runs/mnist_headline_s1 runs/mnist_headline_s2 runs/mnist_headline_s3 runs/mnist_variants
    runs/mnist_omitted3 runs/mnist_only78 runs/mnist_temperature runs/mnist_translated_transfer
    runs/mnist_teacher_ensemble)
"$KD_RUN" report --title "MNIST (section 3 of the paper)" --out docs/results/mnist.md "${runs[@]}"
# The runs' records go beside the report (configuration, command, CSV tables, log; not the
# checkpoints), so that its numbers can be checked, and the report regenerated, without the
# runs: kd-run report --out /tmp/mnist.md docs/results/mnist/runs/*
records=docs/results/mnist/runs
rm -rf "$records"
for run in "${runs[@]}"; do
    mkdir -p "$records/${run##*/}"
    cp "$run"/*.csv "$run"/config.toml "$run"/command.txt "$run"/run.log "$records/${run##*/}/"
done
echo "wall time of the section: $(( ($(date +%s) - start) / 60 )) min"
