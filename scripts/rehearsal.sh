#!/usr/bin/env bash
# A rehearsal of the paper's speech pipeline at the full network size, on a small corpus:
#
#   1. a frame store written from the synthetic corpus with 14,000 tied states;
#   2. two 2 x 512 teachers trained on it, and their ensemble's top-50 soft targets at T = 2
#      written beside the store (`kd-run store targets`, one pass);
#   3. the paper's 8 x 2560 student with a 14,000-way softmax distilled from those targets on 2
#      data-parallel ranks (torchrun) streaming from the store, checkpointing every 10 steps;
#   4. the ranks killed (SIGKILL, the whole job) at a random step after the first checkpoint, the
#      same command run again, which resumes at the last checkpoint and finishes;
#   5. `kd-run report` of both runs; memory per rank, time per step and checkpoint size measured.
#
#   scripts/rehearsal.sh OUT [SEED]
#
# Everything goes under OUT (stores, runs, the generated experiment files, logs, the report and
# OUT/rehearsal.txt with the figures). SEED (default 1) picks the kill step. Needs `make build`
# (kd-run with data parallelism) and .venv/bin/torchrun (`make setup`). On 2 cores it takes
# about 15-25 minutes; docs/speech.md shows a run's figures and what would change on GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

out=${1:?usage: scripts/rehearsal.sh OUT [SEED]}
seed=${2:-1}
kd_run=${KD_RUN:-$root/target/release/kd-run}
torchrun=${TORCHRUN:-$root/.venv/bin/torchrun}
[ -x "$kd_run" ] || { echo "rehearsal: $kd_run not found: run make build" >&2; exit 1; }
[ -x "$torchrun" ] || { echo "rehearsal: $torchrun not found: run make setup" >&2; exit 1; }
"$kd_run" info | grep -q "(Gloo): yes" || { echo "rehearsal: $kd_run was built without data parallelism" >&2; exit 1; }
mkdir -p "$out"
out=$(cd "$out" && pwd)
log() { echo "rehearsal: $*" | tee -a "$out/rehearsal.txt"; }
: > "$out/rehearsal.txt"
# A rehearsal starts from nothing: earlier runs under OUT would be resumed or skipped.
rm -rf "$out/runs" "$out/student.log"

# 1. The corpus: 40 phones, 14,000 tied states, 16 speakers of 12 utterances.
cat > "$out/corpus.toml" <<'EOF'
name = "rehearsal_corpus"
seed = 1
[data]
kind = "speech"
context = [20, 5]
speech = { seed = 1, phones = 40, states = 14000, speakers = 16, utterances_per_speaker = 12, mean_phones_per_utterance = 12 }
[defaults]
epochs = 1
batch_size = 256
optimizer = { kind = "sgd", lr = 0.05 }
[[stages]]
name = "unused"
kind = "train"
model = { hidden = [8] }
EOF
started=$(date +%s)
"$kd_run" -q store write "$out/corpus.toml" --out "$out/store" --kind f16 --replace | tee -a "$out/rehearsal.txt"
log "store written in $(( $(date +%s) - started )) s"

# 2. Two teachers on the store, then their ensemble's top-50 targets at T = 2.
store_data() {
    cat <<EOF
[data]
kind = "store"
context = [20, 5]
store = { dir = "$out/store", shuffle_buffer = 65536, chunk_frames = 8, prefetch = 4 $1 }
EOF
}
{
    printf 'name = "rehearsal_teachers"\nseed = 1\nthreads = 2\n'
    store_data ""
    cat <<'EOF'
[defaults]
epochs = 2
batch_size = 256
optimizer = { kind = "sgd", lr = 0.05, momentum = 0.9 }
[[stages]]
name = "teacher"
kind = "train"
model = { hidden = [512, 512] }
sweep = { seed = [1, 2] }
EOF
} > "$out/teachers.toml"
started=$(date +%s)
"$kd_run" -q run "$out/teachers.toml" --out "$out/runs" | tee -a "$out/rehearsal.txt"
log "teachers trained in $(( $(date +%s) - started )) s"
ckpts="$out/runs/rehearsal_teachers/checkpoints"
started=$(date +%s)
"$kd_run" -q store targets "$out/store/train" --teacher "$ckpts/teacher-s1.safetensors" \
    --teacher "$ckpts/teacher-s2.safetensors" --k 50 --temperature 2 --name ensemble-top50.kdt \
    --device cpu | tee -a "$out/rehearsal.txt"
log "top-50 targets written in $(( $(date +%s) - started )) s ($(du -b "$out/store/train/ensemble-top50.kdt" | cut -f1) bytes)"

# 3. The student: 8 x 2560, 14,000 classes, distilled from the streamed targets on 2 ranks.
{
    printf 'name = "rehearsal_student"\nseed = 1\nthreads = 1\n'
    printf '[checkpoint]\nevery_steps = 10\nkeep = 2\n'
    store_data ', targets = "ensemble-top50.kdt"'
    cat <<EOF
[defaults]
epochs = 2
batch_size = 256
optimizer = { kind = "sgd", lr = 0.02, momentum = 0.9 }
[[stages]]
name = "teacher-1"
kind = "evaluate"
checkpoint = "$ckpts/teacher-s1.safetensors"
sha256 = "$(sha256sum "$ckpts/teacher-s1.safetensors" | cut -d' ' -f1)"
[[stages]]
name = "teacher-2"
kind = "evaluate"
checkpoint = "$ckpts/teacher-s2.safetensors"
sha256 = "$(sha256sum "$ckpts/teacher-s2.safetensors" | cut -d' ' -f1)"
[[stages]]
name = "ensemble"
kind = "ensemble"
members = ["teacher-1", "teacher-2"]
[[stages]]
name = "student"
kind = "distill"
teacher = "ensemble"
teacher_top_k = 50
temperature = 2.0
hard_weight = 0.5
soft_weight = 0.5
model = { hidden = [2560, 2560, 2560, 2560, 2560, 2560, 2560, 2560] }
EOF
} > "$out/student.toml"

# The peak resident memory (VmHWM) of each rank, polled while the job runs.
watch_memory() {
    while sleep 1; do
        # The ranks (named kd-run), not torchrun, whose command line names the file too.
        for pid in $(pgrep -x kd-run || true); do
            grep -qa "$out/student.toml" "/proc/$pid/cmdline" 2>/dev/null || continue
            awk -v a="$(cat "$out/attempt")" -v p="$pid" '/VmHWM/ { print a, p, $2 }' "/proc/$pid/status" 2>/dev/null || true
        done
    done >> "$out/memory.txt"
}
student() {
    setsid "$torchrun" --standalone --nproc-per-node 2 --no-python \
        "$kd_run" run "$out/student.toml" --out "$out/runs" >> "$out/student.log" 2>&1 &
    job=$!
}
: > "$out/memory.txt"
watch_memory &
watcher=$!
trap 'kill $watcher 2>/dev/null || true' EXIT

# 4. Killed at a random step after the first checkpoint, then resumed by the same command.
resume="$out/runs/rehearsal_student/checkpoints/student.resume.safetensors"
started=$(date +%s)
echo killed > "$out/attempt"
student
until [ -f "$resume" ] || ! kill -0 "$job" 2>/dev/null; do sleep 1; done
kill -0 "$job" 2>/dev/null || { echo "rehearsal: the student run ended before its first checkpoint; see $out/student.log" >&2; exit 1; }
wait_s=$(( 5 + (seed * 7919) % 40 ))
log "first checkpoint after $(( $(date +%s) - started )) s; killing the job $wait_s s later"
sleep "$wait_s"
# The ranks first (torchrun starts each in a session of its own), then torchrun.
pkill -KILL -f "kd-run run $out/student.toml" || true
kill -KILL -- "-$job" 2>/dev/null || true
wait "$job" 2>/dev/null || true
log "killed: $(grep -o 'checkpoint at step [0-9]* of epoch [0-9]*' "$out/student.log" | tail -1 || echo 'no step checkpoint yet')"
log "resume checkpoint: $(du -b "$resume" | cut -f1) bytes (weights, momentum, generators, position)"
echo resumed > "$out/attempt"
student
wait "$job"
log "student: killed, resumed and finished in $(( $(date +%s) - started )) s in all"
grep -o 'resuming [a-z]* [a-z0-9 ]* from' "$out/student.log" | head -1 | sed 's/^/rehearsal: /' | tee -a "$out/rehearsal.txt"

# 5. The report and the figures.
"$kd_run" -q report "$out/runs/rehearsal_teachers" "$out/runs/rehearsal_student" --out "$out/report.md"
python3 - "$out" <<'EOF' | tee -a "$out/rehearsal.txt"
import csv, os, sys
out = sys.argv[1]
peak = {}
for line in open(os.path.join(out, "memory.txt")):
    attempt, pid, kb = line.split()
    peak[(attempt, pid)] = max(peak.get((attempt, pid), 0), int(kb))
rows = [r for r in csv.DictReader(open(os.path.join(out, "runs/rehearsal_student/metrics.csv"))) if r["stage"] == "student"]
ckpt = os.path.join(out, "runs/rehearsal_student/checkpoints/student.safetensors")
for attempt in ("killed", "resumed"):
    ranks = sorted((kb for (a, _), kb in peak.items() if a == attempt), reverse=True)
    print(f"peak resident memory per rank, {attempt} run (MB):", ", ".join(f"{kb / 1024:.0f}" for kb in ranks))
for r in rows:
    eps = float(r["examples_per_second"])
    print(f"epoch {r['epoch']}: {eps:.0f} frames/s over 2 ranks, {256 / eps:.2f} s per step of 256 frames, "
          f"{float(r['tflops']):.3f} TFLOP/s, loss {float(r['train_loss']):.3f}, soft_kl {float(r['soft_kl']):.3f}")
print(f"final checkpoint {os.path.getsize(ckpt) / 1e6:.0f} MB (the weights)")
EOF
log "report: $out/report.md"
