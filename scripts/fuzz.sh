#!/bin/bash
# Runs every fuzz target (fuzz/fuzz_targets/) for SECONDS each, one after the other: 600 while
# developing (`make fuzz`), 60 in CI. Fails when any target crashes (a panic, an overflow, a hang,
# an out-of-memory), naming the input that did it and the command that replays it.
#
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (installed here when missing, into a cache that CI keeps between runs when it
# can: PLUMB_FUZZ_CACHE, default /var/cache/plumb-ci/cargo-fuzz) and a nightly toolchain (the
# machine's `nightly`, else the stable one with RUSTC_BOOTSTRAP=1). New inputs a run finds go to
# fuzz/runs/<target>/ (not committed; kept between runs), crashes to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-600}
shift || true
case $seconds in
  '' | *[!0-9]*)
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
    ;;
esac

CARGO_FUZZ_VERSION=0.13.2
cache=${PLUMB_FUZZ_CACHE:-/var/cache/plumb-ci/cargo-fuzz}
export PATH="$cache/bin:$PATH"
if ! cargo-fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  echo "fuzz.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION into $cache"
  cargo install --quiet --locked --root "$cache" --version "$CARGO_FUZZ_VERSION" cargo-fuzz
fi

if rustc +nightly --version >/dev/null 2>&1; then
  cargo=(cargo +nightly)
else
  echo "fuzz.sh: no nightly toolchain; using $(rustc --version) with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
  cargo=(cargo)
fi

# No sanitizer: plumb has no unsafe code, so what a run looks for is panics (debug assertions and
# overflow checks are on), hangs and runaway memory; ASan would only slow the build and the runs.
flags=(--sanitizer none)

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <("${cargo[@]}" fuzz list)
fi

start=$SECONDS
"${cargo[@]}" fuzz build "${flags[@]}"
echo "fuzz.sh: built ${#targets[@]} targets in $((SECONDS - start))s"

failed=()
for t in "${targets[@]}"; do
  mkdir -p "fuzz/runs/$t" "fuzz/artifacts/$t"
  log="fuzz/runs/$t.log"
  # A fixed seed (PLUMB_FUZZ_SEED to change it) so that a run can be repeated.
  options=(-max_total_time="$seconds" -seed="${PLUMB_FUZZ_SEED:-1}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  if [ -f "fuzz/dict/$t.dict" ]; then
    options+=(-dict="fuzz/dict/$t.dict")
  fi
  echo "fuzz.sh: $t for ${seconds}s"
  # New inputs go to the first directory; the committed seeds in fuzz/corpus/ stay as they are.
  if "${cargo[@]}" fuzz run "${flags[@]}" "$t" "fuzz/runs/$t" "fuzz/corpus/$t" -- "${options[@]}" >"$log" 2>&1; then
    grep -E '^Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb' "$log" | sed "s/^/  $t: /" || true
  else
    failed+=("$t")
    echo "fuzz.sh: $t FAILED; from $log:" >&2
    # The panic (what and where), then libFuzzer's own summary.
    grep -m1 -A4 -E 'panicked at|ERROR: libFuzzer' "$log" | sed "s/^/  $t: /" >&2 || true
    grep -E '^SUMMARY|Test unit written|^Error: ' "$log" | sed "s/^/  $t: /" >&2 || true
    for input in $(grep -oE 'Test unit written to [^ ]+' "$log" | sed 's/^Test unit written to //'); do
      echo "fuzz.sh: reproducer: $input" >&2
      echo "fuzz.sh: replay with: ${cargo[*]} fuzz run ${flags[*]} $t $input" >&2
    done
  fi
done

echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: crashed: ${failed[*]}" >&2
  exit 1
fi
