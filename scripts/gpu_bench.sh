#!/usr/bin/env bash
# On a machine with one GPU, PyTorch 2.11 (its python at $PYTHON) and a kd-run release binary
# built elsewhere (scripts/gpu_prepare.sh puts one in dist/): kd-run's acoustic workloads (the
# 8 x 2560 / 14,000-class DNN at batch 1024, trained on labels and distilled from top-50 soft
# targets, f32 and bf16) against the PyTorch reference in the same run, then the fixed speech
# check (scripts/gpu_check.sh). Writes under OUT (default runs-gpu):
#   bench.txt   the whole `kd-run bench` output
#   ratios.txt  its `ratio <workload> <kd-run / PyTorch>` lines
#   speed.txt   frames/s, TFLOP/s and share of the GPU's dense peak of both sides, per workload
#   bench_graphs.txt  the bf16 workloads again with kd-run's steps captured in CUDA graphs
#   bench_b2048.txt, bench_b4096.txt  the bf16 workloads at batch 2048 and 4096
#   graphs_check.txt  speech_tiny's baseline trained eagerly and with CUDA graphs: the same
#               test errors (summary.csv rows of both)
#   gpu_batch/, gpu_batch.txt  experiments/speech/gpu_batch.toml (the 8 x 2560 baseline at
#               batch 1024 to 4096): each stage's last epoch line (val_acc, frames/s, TFLOP/s)
#   speech/     the speech check's runs and report; speech_speed.txt, its epochs' speed lines
# Extra arguments go to every `kd-run run` of the speech check (e.g. `--set
# data.speech.speakers=100 --set defaults.epochs=2` for a shorter one).
# A dry run on a CPU (tiny sizes, one round; about a minute):
#   KD_RUN=target/release/kd-run PYTHON=.venv/bin/python OUT=/tmp/gb scripts/gpu_bench.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
PYTHON=${PYTHON:-/opt/torch/.venv/bin/python}
dry=0
if [ "${1:-}" = "--dry-run" ]; then
    shift
    dry=1
    bench=(--device cpu --acoustic tiny --acoustic-steps 4 --rounds 1)
    check=(--set data.speech.states=200 --set data.speech.speakers=12 --set data.speech.utterances_per_speaker=10
        --set defaults.epochs=1 --set 'stages.baseline.model.hidden=[64,64]'
        --set 'stages.member.model.hidden=[64,64]' --set 'stages.distilled.model.hidden=[64,64]')
    sweep=(--set data.speech.states=200 --set data.speech.speakers=12 --set data.speech.utterances_per_speaker=10
        --set defaults.epochs=1)
    for s in b1024-lr0_05 b2048-lr0_05 b2048-lr0_1 b4096-lr0_1 b4096-lr0_2; do
        sweep+=(--set "stages.$s.model.hidden=[64,64]")
    done
else
    bench=(--device cuda --acoustic full --acoustic-steps 50 --rounds 5)
    check=()
    sweep=()
fi
mkdir -p "$OUT"
start=$(date +%s)
"$KD_RUN" info | tee "$OUT/info.txt"
"$KD_RUN" info --json >"$OUT/info.json"
"$KD_RUN" bench "${bench[@]}" --python "$PYTHON" \
    --only acoustic --only acoustic_bf16 --only acoustic_topk --only acoustic_topk_bf16 | tee "$OUT/bench.txt"
grep '^ratio ' "$OUT/bench.txt" > "$OUT/ratios.txt"
grep '^# acoustic' "$OUT/bench.txt" > "$OUT/speed.txt"
echo "bench: $(( $(date +%s) - start )) s"
if [ "$dry" = 0 ]; then
    "$KD_RUN" bench "${bench[@]}" --python "$PYTHON" --cuda-graphs \
        --only acoustic_bf16 --only acoustic_topk_bf16 | tee "$OUT/bench_graphs.txt" || true
    # The bf16 workloads at the larger batches of experiments/speech/gpu_batch.toml.
    for b in 2048 4096; do
        "$KD_RUN" bench "${bench[@]}" --python "$PYTHON" --acoustic-batch "$b" \
            --only acoustic_bf16 --only acoustic_topk_bf16 | tee "$OUT/bench_b$b.txt" || true
    done
fi
for graphs in false true; do
    "$KD_RUN" run experiments/speech_tiny.toml --out "$OUT/graphs_$graphs" --set cuda_graphs=$graphs \
        --only baseline 2>&1 | tee "$OUT/graphs_$graphs.log" | grep -i 'graph\|test errors' || true
done
for graphs in false true; do
    echo "cuda_graphs = $graphs: $(sed -n 2p "$OUT/graphs_$graphs/speech_tiny/summary.csv")"
done | tee "$OUT/graphs_check.txt"
"$KD_RUN" run experiments/speech/gpu_batch.toml --out "$OUT/gpu_batch" "${sweep[@]}" 2>&1 \
    | tee "$OUT/gpu_batch.log" | grep -E 'epoch ([0-9]+)/\1 ' | tee "$OUT/gpu_batch.txt" || true
OUT="$OUT/speech" scripts/gpu_check.sh "${check[@]}" "$@"
grep -h 'TFLOP/s' "$OUT"/speech/*/run.log > "$OUT/speech_speed.txt" || true
echo "wall time of the GPU bench and check: $(( $(date +%s) - start )) s"
