# The two set-up commands of the README, the generated docs, and the benchmarks. Each installs what it needs first.
.PHONY: demo test bench deps lint docs fuzz

deps:
	bash scripts/install-deps.sh

demo: deps
	bash scripts/demo.sh

# The integration tests are one binary, tests/it/ (`cargo test --test it daemon::` runs one module).
test: deps
	cargo test --all-targets

# Man pages and shell completions, generated from the clap definitions (src/docs.rs).
docs:
	cargo run --quiet --example gen-docs -- target/docs

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps

# One machine's costs, how they grow with services, push-to-applied latency in a container, a simulated
# fleet and one rolling out through waves: each appends its table to bench/RESULTS.md.
bench: deps
	bash bench/machine.sh
	bash bench/scale.sh
	bash bench/push-latency.sh
	bash bench/fleet.sh
	bash bench/waves.sh

# Every fuzz target (fuzz/) for 10 minutes each; `bash scripts/fuzz.sh SECONDS [TARGET...]` for other runs.
fuzz:
	bash scripts/fuzz.sh
