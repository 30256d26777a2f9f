# The two set-up commands of the README, and the benchmarks. Each installs what it needs first.
.PHONY: demo test bench deps lint

deps:
	bash scripts/install-deps.sh

demo: deps
	bash scripts/demo.sh

test: deps
	cargo test --all-targets

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

bench: deps
	bash bench/idle-tick.sh
