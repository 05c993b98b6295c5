# Quick start: `make run` (set up, then the default MNIST distillation) and `make test`.
# Every target sets up what it needs first; setup skips what is already there.
KD_RUN := target/release/kd-run

.PHONY: setup build run test bench check mnist-section clean-runs

setup:
	scripts/setup.sh

build: setup
	cargo build --release -p kd-run

run: build
	$(KD_RUN) run experiments/mnist.toml

test: setup
	cargo test --release --workspace
	scripts/test_external.sh

bench: build
	$(KD_RUN) bench

# The paper's whole MNIST section and docs/results/mnist.md (hours on a CPU; see
# experiments/mnist/README.md).
mnist-section: build
	scripts/mnist_section.sh

# What to run before a commit: formatting, lints, tests.
check: setup
	cargo fmt --all -- --check
	cargo fmt --manifest-path examples/external/Cargo.toml -- --check
	cargo clippy --release --all-targets -- -D warnings
	cargo test --release --workspace
	scripts/test_external.sh

clean-runs:
	rm -rf runs
