#!/usr/bin/env bash
# The fixed GPU check (docs/speech.md): on a machine with one GPU and PyTorch 2.11's libtorch,
# with a kd-run release binary built elsewhere (scripts/gpu_prepare.sh puts one in dist/).
# Writes its runs and report under OUT (default runs-gpu). Extra arguments go to every
# `kd-run run` (e.g. smaller `--set` sizes for a dry run on a CPU).
# A dry run on a CPU (tiny corpus and nets, one epoch; about 10 s):
#   KD_RUN=target/release/kd-run OUT=/tmp/gc scripts/gpu_check.sh --set data.speech.states=200 \
#     --set data.speech.speakers=12 --set data.speech.utterances_per_speaker=10 --set defaults.epochs=1 \
#     --set 'stages.baseline.model.hidden=[64,64]' --set 'stages.member.model.hidden=[64,64]' \
#     --set 'stages.distilled.model.hidden=[64,64]'
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
"$KD_RUN" info
start=$(date +%s)
# The share of the GPU's peak in each epoch's log line comes from kd-run's table of known GPUs.
"$KD_RUN" run experiments/speech/gpu.toml --out "$OUT" "$@"
# The same baseline for one epoch in f32, to compare the throughput of the two precisions.
"$KD_RUN" run experiments/speech/gpu.toml --out "$OUT" --set precision=f32 --set name=speech_gpu_f32 \
    --set stages.baseline.epochs=1 --only baseline "$@"
"$KD_RUN" report --title "Speech on one GPU" --out "$OUT/speech_gpu.md" "$OUT/speech_gpu" "$OUT/speech_gpu_f32"
echo "wall time of the GPU check: $(( $(date +%s) - start )) s"
