#!/usr/bin/env bash
# Copies a stage's final checkpoint out of a finished run into the repository, with a provenance
# file beside it (command, commit, test errors, SHA-256) that kd-run checks whenever it reads
# the checkpoint:
#
#   scripts/ship_teacher.sh runs/mnist_headline_s1 teacher data/teachers/mnist_headline_teacher.safetensors
#
# KD_TRAINED_AT=<commit> names the commit of the kd-run that trained it, when that is not HEAD.
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "usage: $0 RUN_DIR STAGE DEST.safetensors" >&2
    exit 2
fi
run=$1 stage=$2 dest=$3
ckpt="$run/checkpoints/$stage.safetensors"
[ -f "$ckpt" ] || { echo "$0: $ckpt does not exist (has stage '$stage' of $run finished?)" >&2; exit 1; }
case "$dest" in *.safetensors) ;; *) echo "$0: DEST must end in .safetensors" >&2; exit 2 ;; esac

# The stage's row of summary.csv: its test errors; the test set's size from its accuracy.
row=$(awk -F, -v s="$stage" 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $1 == s { e = $col["test_errors"]; a = $col["test_accuracy"]; printf "%d %d\n", e, e / (1 - a) + 0.5 }' "$run/summary.csv")
[ -n "$row" ] || { echo "$0: no row for '$stage' in $run/summary.csv" >&2; exit 1; }
read -r errors examples <<< "$row"
command=$(sed 's/\\/\\\\/g; s/"/\\"/g' "$run/command.txt")   # a TOML basic string
# The commit whose kd-run trained the model: KD_TRAINED_AT when the run was made by an older
# binary than this checkout's, else this checkout's.
commit=${KD_TRAINED_AT:-$(git rev-parse HEAD)}
if [ -z "${KD_TRAINED_AT:-}" ] && ! git diff --quiet HEAD -- crates Cargo.toml Cargo.lock; then
    commit="$commit (with uncommitted changes)"
fi

mkdir -p "$(dirname "$dest")"
cp "$ckpt" "$dest.tmp" && mv "$dest.tmp" "$dest"
provenance="${dest%.safetensors}.provenance.toml"
cat > "$provenance.tmp" <<TOML
# Made by scripts/ship_teacher.sh from the run directory $run; kd-run checks the SHA-256
# every time it reads $(basename "$dest").
sha256 = "$(sha256sum "$dest" | cut -d' ' -f1)"
command = "$command"
commit = "$commit"
stage = "$stage"
test_errors = $errors
test_examples = $examples
TOML
mv "$provenance.tmp" "$provenance"
echo "wrote $dest and $provenance ($errors test errors of $examples)"
