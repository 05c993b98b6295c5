#!/usr/bin/env bash
# Uses the crates from outside the workspace the way docs/using-the-crates.md tells a user to,
# and checks that the page still says what is tested:
#   1. the page's build.rs is, byte for byte, every crate's build.rs (kd-native's, which also
#      compiles C++, aside) and examples/external's,
#      and its src/main.rs is crates/kd-models/examples/distill_step.rs;
#   2. the page's Cargo.toml, build.rs and src/main.rs, put in a new project, build and run;
#   3. examples/external (teachers, ensemble, distillation, checkpoint) builds and runs.
# Only LIBTORCH is set, as the page says. CARGO_TARGET_DIR=target shares the workspace's build
# of tch (a new target directory compiles tch's C++ wrapper again: minutes); a user's project
# builds the same way in its own target directory.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
page=docs/using-the-crates.md

# The code block that follows `<!-- file: NAME -->` in the page, less the indentation of its
# fence (blocks inside a list item are indented).
block() {
    awk -v marker="<!-- file: $1 -->" '
        { line = $0; sub(/^ +/, "", line) }
        line == marker { found = 1; next }
        found && line ~ /^```/ { if (inside) exit; inside = 1; indent = index($0, "`") - 1; next }
        inside { print substr($0, indent + 1) }
    ' "$page"
}
for name in Cargo.toml build.rs src/main.rs; do
    [ -n "$(block "$name")" ] || { echo "$page has no '<!-- file: $name -->' block" >&2; exit 1; }
done
for f in crates/*/build.rs examples/external/build.rs; do
    # kd-native's build script also compiles its C++ shim; it links libtorch the same way.
    [ "$f" = crates/kd-native/build.rs ] && continue
    diff -u <(block build.rs) "$f" || { echo "$f differs from the build.rs of $page" >&2; exit 1; }
done
diff -u <(block src/main.rs) crates/kd-models/examples/distill_step.rs \
    || { echo "crates/kd-models/examples/distill_step.rs differs from the src/main.rs of $page" >&2; exit 1; }

export LIBTORCH="$root/.venv/libtorch"
export CARGO_TARGET_DIR="$root/target"

# A new project made of the page's blocks only (its own workspace; the workspace's lock file
# pins the same dependency versions, so the shared build is reused).
project=target/readme-project
rm -rf "$project" && mkdir -p "$project/src"
{
    printf '[package]\nname = "readme-project"\nversion = "0.1.0"\nedition = "2021"\n\n'
    block Cargo.toml | sed "s|/path/to/kd|$root|g"
    printf '\n[workspace]\n\n[profile.release]\ndebug = "line-tables-only"\n'
} > "$project/Cargo.toml"
block build.rs > "$project/build.rs"
block src/main.rs > "$project/src/main.rs"
cp Cargo.lock "$project/"
echo "test_external: the project of $page"
cargo run --release --quiet --manifest-path "$project/Cargo.toml"

echo "test_external: examples/external"
cargo run --release --quiet --manifest-path examples/external/Cargo.toml
