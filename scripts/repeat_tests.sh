#!/usr/bin/env bash
# The repeat check: runs every unit and integration test binary of the workspace N times, each
# round with another `--test-threads` (1, 2, 4, 8, 16 in turn), and lists each test that ever
# failed with its failure count. A test that depends on another's state (libtorch's global
# generator, the thread count, environment variables, files, ports) shows up here even when one
# `make test` passes. Exit status 0 only when every round passed.
#
#   scripts/repeat_tests.sh N [NAME...]
#
# NAMEs keep only the test binaries whose names start with one of them (kd_core, kd_models,
# kd_run, smoke, dist, ...). The binaries are built once (`cargo test --no-run`, release, the
# features of `make test`); each runs from its package's folder, as `cargo test` runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:?usage: scripts/repeat_tests.sh N [NAME...]}
shift
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "repeat_tests: N must be a positive integer, got '$rounds'" >&2; exit 2; }
python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )

# "executable<TAB>package folder" of every test binary.
list=$(cargo test --release --workspace --no-run --message-format=json 2>/dev/null | "$python" -c '
import json, os, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"] + "\t" + os.path.dirname(m["manifest_path"]))
')
[ -n "$list" ] || { echo "repeat_tests: cargo test --no-run built no test binaries (run it to see why)" >&2; exit 1; }

keep() {
    local name=$1
    [ $# -eq 1 ] && return 0
    shift
    for prefix in "$@"; do [[ $name == "$prefix"* ]] && return 0; done
    return 1
}

log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
threads=(1 2 4 8 16)
failed_rounds=0
for ((round = 1; round <= rounds; round++)); do
    t=${threads[$(((round - 1) % ${#threads[@]}))]}
    started=$SECONDS
    round_failed=0
    while IFS=$'\t' read -r exe dir; do
        name=$(basename "$exe")
        name=${name%-*}
        keep "$name" "$@" || continue
        out="$log/out"
        if (cd "$dir" && "$exe" --test-threads="$t") >"$out" 2>&1; then
            continue
        else
            status=$?
        fi
        round_failed=1
        # The list under libtest's last "failures:" heading names every failed test.
        failures=$(awk '/^failures:$/ { n = 0; delete list; inside = 1; next }
                        inside && /^    [^ ]+$/ { list[n++] = substr($0, 5); next }
                        /^test result:/ { inside = 0 }
                        END { for (i = 0; i < n; i++) print list[i] }' "$out")
        if [ -z "$failures" ]; then
            # The binary died without naming a test (abort, signal, a hang killed from outside).
            echo "$name: exited with status $status naming no failed test" >>"$log/failures"
            tail -n 20 "$out" >"$log/crash-$name-$round"
        else
            sed "s|^|$name: |" <<<"$failures" >>"$log/failures"
            cp "$out" "$log/failed-$name-$round"
        fi
    done <<<"$list"
    failed_rounds=$((failed_rounds + round_failed))
    echo "round $round/$rounds (--test-threads=$t): $([ $round_failed = 0 ] && echo passed || echo FAILED) in $((SECONDS - started)) s"
done

if [ -s "$log/failures" ]; then
    echo
    echo "failed in $failed_rounds of $rounds rounds; count and test:"
    sort "$log/failures" | uniq -c | sort -rn
    first=$(ls "$log" | grep -E '^(failed|crash)-' | head -n 1)
    echo
    echo "output of the first failure ($first):"
    tail -n 40 "$log/$first"
    exit 1
fi
echo "all $rounds rounds passed"
